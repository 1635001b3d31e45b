# Production image: the gridtalk binary only (no embedded broker, no WhatsApp sandbox).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config zlib1g-dev \
        libzstd-dev libsasl2-dev libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The repository's history is not copied (.dockerignore): pass the commit for --version and
# gridtalk_build_info, e.g. --build-arg GRIDTALK_COMMIT=$(git rev-parse --short=12 HEAD).
ARG GRIDTALK_COMMIT=unknown
RUN cargo build --release --locked -p gridtalk \
    && cp target/release/gridtalk /usr/local/bin/gridtalk

FROM debian:bookworm-slim
# The libraries librdkafka links, and for Kerberos logins the Cyrus SASL GSSAPI plugin and kinit.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
        libzstd1 libsasl2-2 libsasl2-modules-gssapi-mit libcurl4 krb5-user \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home gridtalk
COPY --from=build /usr/local/bin/gridtalk /usr/local/bin/gridtalk
COPY deploy/kubernetes/gridtalk.toml /etc/gridtalk/gridtalk.toml
USER 10001
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/gridtalk"]
CMD ["run", "--config", "/etc/gridtalk/gridtalk.toml"]
