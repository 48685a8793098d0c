# The image charts/kvgate runs: `kvgate` is the entrypoint, the chart passes the subcommand
# (gateway, worker, bridge). Build from the repository root:
#   docker build -t kvgate:0.1.0 .                           # gateway, bridges, mock + torch (CPU) workers
#   docker build -t kvgate:0.1.0-slim --build-arg EXTRAS= .  # no torch: gateway, bridges, mock workers
#   docker build -t kvgate:0.1.0-cu128 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# (tests/charts/test_dockerfile.py and test_image.py check this file against pyproject.toml and the chart.)

FROM python:3.11-slim AS build

# pyproject.toml's extras to install: "torch" for the torch worker; empty for none.
ARG EXTRAS=torch
# torch comes from this index, not PyPI, whose Linux torch is the CUDA build (gigabytes of CUDA
# libraries). A CUDA variant: https://download.pytorch.org/whl/cu128 (match your driver); empty: PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The torch release this project is tested with.
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kvgate
ENV PATH=/opt/kvgate/bin:$PATH

# torch first, on its own layer: it is the big one and does not change with the code. Installed here
# from TORCH_INDEX_URL, it is already satisfied when `.[torch]` is installed below.
RUN case ",${EXTRAS}," in \
      *,torch,*) if [ -n "${TORCH_INDEX_URL}" ]; then \
          pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
        fi ;; \
    esac

# The dependencies on their own layer, rebuilt only when pyproject.toml (or the readme and licence,
# part of the metadata) changes: the project installed before its packages are copied pulls them all in.
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
RUN pip install --no-cache-dir "./${EXTRAS:+[${EXTRAS}]}"

# Then the code. One COPY per package: a COPY of several folders would merge their contents into one.
COPY gateway/ gateway/
COPY router/ router/
COPY engines/ engines/
COPY loadgen/ loadgen/
COPY kvutil/ kvutil/
RUN pip install --no-cache-dir --no-deps --force-reinstall ./


FROM python:3.11-slim AS runtime

# The same venv path as in the build stage: its scripts' shebangs point there.
COPY --from=build /opt/kvgate /opt/kvgate
ENV PATH=/opt/kvgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it; a home for caches (matplotlib).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/kvgate kvgate
USER 10001:10001
WORKDIR /home/kvgate

# The chart's gateway and worker port (`--port 8000`); a bridge listens on nothing. No HEALTHCHECK:
# one image runs three commands with different endpoints, and the chart has Kubernetes probes.
EXPOSE 8000

ENTRYPOINT ["kvgate"]
CMD ["--help"]
