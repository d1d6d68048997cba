"""Assemble the receiver's Beam pipeline from a Config."""

from __future__ import annotations

import dataclasses
import logging

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from core.errors import ConfigError
from pipeline.config import Config, FilterOptions, NormalizeOptions
from sinks.dnstap import WriteToDnstap
from sinks.dnstap_file import WriteToDnstapFile
from sinks.file import WriteToFile
from sinks.kafka import WriteToKafka
from sinks.metrics import WriteMetrics
from sinks.pgsql import WriteToPostgres
from sinks.stdout import WriteToStdout
from sinks.syslog import WriteToSyslog
from sinks.tcp import WriteToTcp
from sources.framestream_io import ReadFromFrameStream
from sources.kafka_io import ReadFromKafka, StopOnHubShutdown
from sources.listener import HubSpec, TcpServerSpec, UnixServerSpec
from sources.sniffer import sniffer_spec
from sources.tcp_client import TcpClientSpec
from transforms.decode import DecodeDnstap
from transforms.filter import FilterMessages
from transforms.geoip import EnrichGeoIP
from transforms.latency import MatchLatency
from transforms.normalize import NormalizeQnames
from transforms.privacy import ApplyPrivacy
from transforms.statistics import PublishStatistics, StatsSpec

__all__ = [
    "LOCAL_RUNNERS",
    "add_outputs",
    "add_transforms",
    "build_live_pipeline",
    "check_kafka_input",
    "hub_spec",
    "make_runner",
    "needs_raw",
    "stats_spec",
    "transform_steps",
]

log = logging.getLogger("dnstap_receiver")

# Runner names that mean "this process": run on the FnApiRunner directly. The
# stock DirectRunner would first try to download Prism, then fall back to the
# FnApiRunner anyway (see README, "Runners").
LOCAL_RUNNERS = {None, "DirectRunner", "FnApiRunner", "SwitchingDirectRunner"}


def hub_spec(config: Config) -> HubSpec:
    inp = config.input
    tcp = ()
    if inp.tcp_socket.enable:
        t = inp.tcp_socket
        tcp = (
            TcpServerSpec(
                addresses=tuple(t.local_address),
                port=t.local_port,
                access_control_list=tuple(t.access_control_list),
                tls_cert=t.tls_server_cert if t.tls_support else None,
                tls_key=t.tls_server_key if t.tls_support else None,
            ),
        )
    unix = ()
    if inp.unix_socket.enable:
        unix = (UnixServerSpec(path=inp.unix_socket.path, mode=inp.unix_socket.mode),)
    feeders = []
    if inp.tcp_client.enable:
        c = inp.tcp_client
        feeders.append(
            TcpClientSpec(
                address=c.remote_address,
                port=c.remote_port,
                retry=c.retry,
                tls=c.tls_support,
                tls_ca_file=c.tls_ca_file,
                tls_insecure=c.tls_insecure,
            )
        )
    if inp.kafka.enable:
        # Feeds nothing: the hub closes it at shutdown, which ends the Kafka source.
        feeders.append(StopOnHubShutdown())
    if inp.sniffer.enable:
        feeders.append(sniffer_spec(inp.sniffer))
    return HubSpec(
        tcp=tcp,
        unix=unix,
        feeders=tuple(feeders),
        max_frame_size=inp.max_frame_size,
        batch_size=inp.batch_size,
        queue_size=inp.queue_size,
    )


def make_runner(options: PipelineOptions):
    """The runner object for ``options``: the in-process FnApiRunner for the
    local runner names, else None (Beam resolves the named runner itself)."""
    if options.view_as(StandardOptions).runner in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return None


def transform_steps(config: Config) -> list[tuple[str, beam.PTransform]]:
    """The transforms ``config`` enables, in their fixed order:

    normalise (names as they will be counted and matched) -> match latency
    (before filtering, which may drop the queries) -> filter -> GeoIP (on the
    real client address) -> privacy (last, so nothing before it sees less).
    Building them validates their files (lists, databases): ConfigError.
    """
    steps: list[tuple[str, beam.PTransform]] = []
    if config.normalize != NormalizeOptions():
        steps.append(("NormalizeQnames", NormalizeQnames(config.normalize)))
    if config.latency.enable:
        steps.append(("MatchLatency", MatchLatency(config.latency)))
    if config.filter != FilterOptions():
        steps.append(("FilterMessages", FilterMessages(config.filter)))
    if config.geoip.enable:
        steps.append(("EnrichGeoIP", EnrichGeoIP(config.geoip)))
    privacy = config.privacy
    if privacy.anonymize_ip or privacy.hash_ip or privacy.minimize_qname:
        steps.append(("ApplyPrivacy", ApplyPrivacy(privacy)))
    return steps


def add_transforms(records, config: Config):
    steps = transform_steps(config)
    log.info("transforms: %s", " -> ".join(label for label, _ in steps) or "none")
    for label, transform in steps:
        if isinstance(transform, FilterMessages):
            log.info("%s", transform.description)
        records = records | label >> transform
    return records


def stats_spec(config: Config) -> StatsSpec:
    """The live statistics store of ``config`` (the pipeline writes it, the API reads it)."""
    st = config.statistics
    return StatsSpec(
        window_seconds=st.window,
        keep_windows=st.keep_windows,
        top_capacity=st.top_capacity,
        max_identities=st.max_identities,
        qname_lowercase=st.qname_lowercase,
    )


# Outputs whose PTransform takes their config section as it is.
_SECTION_SINKS = (
    ("tcp_socket", WriteToTcp),
    ("syslog", WriteToSyslog),
    ("dnstap", WriteToDnstap),
    ("dnstap_file", WriteToDnstapFile),
    ("kafka", WriteToKafka),
    ("pgsql", WriteToPostgres),
)


def needs_raw(config: Config) -> bool:
    """Whether an output writes the original dnstap bytes (decode keeps them)."""
    return config.output.dnstap.enable or config.output.dnstap_file.enable


def add_outputs(records, config: Config) -> None:
    out = config.output
    privacy = config.privacy
    if (out.dnstap.enable or out.dnstap_file.enable) and (
        privacy.anonymize_ip or privacy.hash_ip or privacy.minimize_qname
    ):
        log.warning("output.dnstap and output.dnstap-file write the original dnstap messages: "
                    "the privacy settings do not apply to them")
    if out.stdout.enable:
        records | "WriteToStdout" >> WriteToStdout(format=out.stdout.format)
    if out.file.enable:
        f = out.file
        records | "WriteToFile" >> WriteToFile(
            f.file, format=f.format, max_size=f.file_max_size, count=f.file_count
        )
    if out.metrics.enable:
        m = out.metrics
        records | "WriteMetrics" >> WriteMetrics(
            interval=m.interval, cumulative=m.cumulative, path=m.file, max_size=m.file_max_size, count=m.file_count
        )
    for section, sink in _SECTION_SINKS:
        options = getattr(out, section)
        if options.enable:
            records | sink.__name__ >> sink(options)


def check_kafka_input(config: Config) -> None:
    """input.kafka runs alone and gives records, not dnstap: ConfigError for
    another input enabled with it (the local runner would materialise the
    Flatten that merges them, so nothing would flow until both ended), or
    for an output that needs the original dnstap bytes."""
    others = []
    for f in dataclasses.fields(config.input):
        section = getattr(config.input, f.name)
        enabled = getattr(section, "enable", False)
        if enabled and f.name != "kafka":
            others.append("input." + f.name.replace("_", "-"))
    if others:
        raise ConfigError(
            f"input.kafka: runs alone, but {' and '.join(others)} {'is' if len(others) == 1 else 'are'} enabled "
            "too (input.tcp-socket is enabled by default): set their enable to false"
        )
    raw = [name for name, section in (("output.dnstap", config.output.dnstap),
                                      ("output.dnstap-file", config.output.dnstap_file)) if section.enable]
    if raw:
        raise ConfigError(
            f"{' and '.join(raw)}: cannot be fed by input.kafka: its JSON records do not carry the "
            "original dnstap messages these outputs write"
        )


def build_live_pipeline(config: Config, options: PipelineOptions, spec: HubSpec | None = None) -> beam.Pipeline:
    """Sockets -> decode (or input.kafka's records) -> transforms -> outputs,
    with no GroupByKey so that every step is fused with the source and runs
    live on the local runner."""
    p = beam.Pipeline(runner=make_runner(options), options=options)
    if config.input.kafka.enable:
        check_kafka_input(config)
        # Already records: nothing to decode.
        records = p | "ReadFromKafka" >> ReadFromKafka(config.input.kafka, batch_size=config.input.batch_size)
    else:
        records = (
            p
            | "ReadFromFrameStream" >> ReadFromFrameStream(spec or hub_spec(config))
            | "DecodeDnstap" >> DecodeDnstap(keep_raw=needs_raw(config))
        )
    records = add_transforms(records, config)
    if config.statistics.enable:
        # Counted after the transforms: filtered messages are counted apart, per
        # reason, and with privacy on the tables never hold a real client address.
        records | "PublishStatistics" >> PublishStatistics(stats_spec(config))
    add_outputs(records, config)
    return p
