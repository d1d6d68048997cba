"""Engine-free core of the dnstap receiver: codecs, decoding, formats.

Nothing in this package imports Apache Beam; the Beam transforms in
``sources``, ``transforms`` and ``sinks`` are thin wrappers around it.
"""
