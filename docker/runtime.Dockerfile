# The runtime image: `pagedserve serve MODEL_DIR ...` on a CUDA base. Build from the repository root:
#   docker build -f docker/runtime.Dockerfile -t ghcr.io/pagedserve/runtime:0.1.0 .
# The operator runs it as `pagedserve serve` (runtime container) and `python3 -m pagedserve.operator.fetch`
# (init container for model URIs), so both must be on PATH.
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/pagedserve PATH=/opt/pagedserve/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv $VIRTUAL_ENV \
 && ln -sf $VIRTUAL_ENV/bin/python /usr/local/bin/python3

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY runtime runtime
COPY kernels kernels
COPY operator operator
# CUDA wheels of torch come from PyPI's default index; huggingface_hub/boto3 serve the fetch init container.
RUN pip install . huggingface_hub boto3 && rm -rf /src

RUN useradd --uid 1000 --create-home pagedserve
USER 1000
WORKDIR /home/pagedserve
EXPOSE 8000
ENTRYPOINT []
CMD ["pagedserve", "serve", "--help"]
