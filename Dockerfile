# GPU image for the Digital Slide Archive: slicer_cli_web runs
#   docker run IMAGE --list_cli
#   docker run IMAGE NucleusDetection --xml
#   docker run IMAGE NucleusDetection <args>
# The base image provides CUDA, torch and torchvision.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="nucleus-models" \
      org.opencontainers.image.description="Nucleus detection and folder-job Slicer CLIs for the Digital Slide Archive" \
      org.opencontainers.image.licenses="Apache-2.0" \
      com.nvidia.volumes.needed="nvidia_driver"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/nucleus-models
COPY pyproject.toml README.md slicer_cli_list.json ./
COPY scripts ./scripts
COPY nucleus_models ./nucleus_models
COPY cli ./cli
COPY benchmark ./benchmark
# the shipped models' training configs: `nucleus-bench finetune` starts from them
COPY configs ./configs

# The same install steps `make setup` runs; torch comes from the base image.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN TORCH_SPEC="" PYTHON=python bash scripts/install.sh \
    && python -m cli --list_cli \
    && python -m cli NucleusDetection --xml > /dev/null

WORKDIR /opt/nucleus-models/cli
ENTRYPOINT ["python", "-m", "cli"]
