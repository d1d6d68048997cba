"""ReadFromFrameStream: the live Frame Streams inputs as an unbounded Beam source.

A Splittable DoFn drains the process's :class:`ListenerHub` queue. Each call
to ``process`` takes batches for at most ``BUNDLE_SECONDS`` (blocking at most
``POLL_SECONDS`` on an empty queue, so an idle receiver does not spin), yields
them, advances the watermark and defers the rest of the restriction; the
bundle ends there, so downstream sinks flush at least that often. When the
hub shuts down it puts END on the queue and the DoFn claims the rest of its
restriction, which ends the pipeline.
"""

from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Timestamp

from sources.listener import END, HubSpec, get_hub
from transforms.batches import FrameBatch

__all__ = ["ReadFromFrameStream"]

_LAST_OFFSET = 2**62


class _WholeStreamProvider(RestrictionProvider):
    """One restriction covering the whole (endless) stream; never split,
    since all batches come from one queue in this process."""

    def initial_restriction(self, element):
        return OffsetRange(0, _LAST_OFFSET)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def split(self, element, restriction):
        yield restriction

    def restriction_size(self, element, restriction):
        return restriction.size()


class _DrainHubFn(beam.DoFn):
    BUNDLE_SECONDS = 1.0
    POLL_SECONDS = 0.2

    def __init__(self, spec: HubSpec) -> None:
        self._spec = spec

    def setup(self) -> None:
        self._hub = get_hub(self._spec)
        self._batches = Metrics.counter("dnstap_receiver", "input_batches")
        self._frames = Metrics.counter("dnstap_receiver", "input_frames")

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element,
        tracker=beam.DoFn.RestrictionParam(_WholeStreamProvider()),
        watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider()),
    ):
        queue = self._hub.queue
        position = tracker.current_restriction().start
        deadline = time.monotonic() + self.BUNDLE_SECONDS
        while True:
            try:
                batch = queue.get(timeout=self.POLL_SECONDS)
            except TimeoutError:
                break
            if batch is END:
                tracker.try_claim(_LAST_OFFSET - 1)
                return
            if not tracker.try_claim(position):
                return
            position += 1
            self._batches.inc()
            self._frames.inc(len(batch))
            yield beam.window.TimestampedValue(batch, Timestamp.now())
            if time.monotonic() >= deadline:
                break
        watermark.set_watermark(Timestamp.now())
        tracker.defer_remainder()


class ReadFromFrameStream(beam.PTransform):
    """Batches (lists) of raw dnstap frames from the live inputs of ``spec``."""

    def __init__(self, spec: HubSpec) -> None:
        super().__init__()
        if not spec.tcp and not spec.unix and not spec.feeders:
            raise ValueError("ReadFromFrameStream needs at least one live input")
        self._spec = spec

    def expand(self, pbegin):
        drain = beam.ParDo(_DrainHubFn(self._spec)).with_output_types(FrameBatch)
        return pbegin | "Impulse" >> beam.Impulse() | "DrainListeners" >> drain
