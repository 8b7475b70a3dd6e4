# One image for every Despina service; compose.yaml picks the command per container.
FROM python:3.11-slim
WORKDIR /opt/despina
COPY pyproject.toml README.md ./
COPY common ./common
COPY services ./services
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch>=2.1,<2.15" \
    && pip install --no-cache-dir .
COPY model_repository /models
ENTRYPOINT ["despina"]
