# syntax=docker/dockerfile:1
# bbr: the image charts/body-based-routing runs.
#
#   docker build -t bbr:0.1.0 .
#   docker run --rm bbr:0.1.0 --help
#
# Python 3.11 on Debian bookworm, slim: no compilers, and none needed (every dependency
# installs from a binary wheel, --only-binary enforces it). The tag is exact; pin the
# digest as well (python:3.11.14-slim-bookworm@sha256:...) when you mirror it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: a virtualenv holding bbr and its dependencies ----------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV VIRTUAL_ENV=/opt/bbr \
    PATH=/opt/bbr/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv $VIRTUAL_ENV
WORKDIR /src

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --only-binary=:all: --requirement requirements.txt \
    && pip install --only-binary=:all: --no-deps --force-reinstall \
        "opentelemetry-proto==$(python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
# (the last step: xds-protos ships an older opentelemetry/proto that can overwrite
# opentelemetry-proto's own and break the OTLP exporter behind --tracing)

# Then bbr itself, with the dependencies left as they are; pip goes, nothing installs later.
COPY README.md ./
COPY bbr/ bbr/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && pip uninstall --yes --quiet pip setuptools

# --- runtime: the virtualenv on the same base, as an unprivileged user ----------------------
FROM ${PYTHON_IMAGE}
COPY --from=build /opt/bbr /opt/bbr
ENV PATH=/opt/bbr/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# 65532: the conventional "nonroot" uid/gid; the chart's securityContext runs as it too.
USER 65532:65532
WORKDIR /tmp
# ext_proc gRPC, grpc.health.v1, Prometheus /metrics.
EXPOSE 9004 9005 9090
ENTRYPOINT ["bbr", "serve"]
# Without arguments: watch labelled ConfigMaps in the pod's own namespace.
CMD ["--kubernetes"]
