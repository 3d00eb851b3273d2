# Builds every Meterline binary. One image: the all-in-one `meterline`
# (embedded store; mount a volume at /data) and one binary per service:
#   docker build -t meterline . && docker run -v meterline:/data -p 8080:8080 meterline \
#     meterline --data-dir /data --listen 0.0.0.0:8080
#   docker run meterline meterline-ingest --config ...
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p meterline -p meterline-ingest -p meterline-aggregator -p meterline-query-api

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meterline /src/target/release/meterline-ingest /src/target/release/meterline-aggregator /src/target/release/meterline-query-api /usr/local/bin/
COPY config /etc/meterline
USER nobody
