# One image for every service and edge process of the platform; the command picks which.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY scripts ./scripts
COPY deploy/sites ./deploy/sites
RUN pip install .
RUN useradd --system --uid 10001 dr && mkdir -p /var/lib/dr && chown dr /var/lib/dr
USER dr
EXPOSE 8101 8102 8103 8104 8105
CMD ["python", "-m", "services.registration"]
