from setuptools import find_packages, setup

RUNTIME = [
    "apache-beam==2.77.0",
    "protobuf==6.33.6",
    "dnspython==2.9.2",
    "PyYAML==6.0.4",
    "orjson==3.13.0",
    # The HTTP API and Prometheus metrics are on in the default configuration.
    "aiohttp==3.14.5",
    "prometheus-client==0.26.0",
]

setup(
    name="dnstap-beam-receiver",
    version="0.1.0",
    description="dnstap receiver built as an Apache Beam pipeline",
    python_requires=">=3.11",
    packages=find_packages(include=["core", "pipeline", "sources", "transforms", "sinks"]),
    package_data={
        "core": ["dnstap.proto", "data/public_suffix_list.dat", "data/README.md"],
        "pipeline": ["dnstap.conf", "openapi.yaml", "dashboard/*.html", "dashboard/*.js", "dashboard/*.css"],
    },
    install_requires=RUNTIME,
    extras_require={
        "geoip": ["geoip2==5.3.0"],
        "kafka": ["kafka-python==3.0.12"],
        "pgsql": ["psycopg2-binary==2.9.13"],
    },
    entry_points={"console_scripts": ["dnstap_receiver=pipeline.cli:main"]},
)
