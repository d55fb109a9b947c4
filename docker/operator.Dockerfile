# The operator image: `pagedserve operator`, small and non-root. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/pagedserve/operator:0.1.0 .
# It installs the distribution without its heavy runtime dependencies (torch, transformers): the
# operator imports only pagedserve.operator, kopf, aiohttp, pydantic, prometheus-client and PyYAML.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY runtime runtime
COPY kernels kernels
COPY operator operator
RUN pip install --no-deps . \
 && pip install "kopf>=1.37" "aiohttp>=3.9" "pydantic>=2.6" "prometheus-client>=0.20" "pyyaml>=6" \
 && rm -rf /src

# The chart runs it with a read-only root filesystem, as this user, with /tmp an emptyDir.
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["pagedserve", "operator"]
CMD ["--all-namespaces"]
