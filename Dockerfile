# sealgate container image: build with the Rust toolchain, run on a minimal
# base as a non-root user. Config (and, later, keys) are mounted read-only.
#   docker build -t sealgate .
#   docker run --rm -v $PWD/config:/etc/sealgate:ro sealgate check -c /etc/sealgate/sealgate.toml
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock dev.sh ./
COPY src ./src
COPY benches ./benches
COPY pgo ./pgo
# Profile-guided, from the committed profile (about 5 min on 2 cores).
RUN cp "$(./dev.sh release)" /sealgate

# distroless/cc: glibc, CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /sealgate /usr/local/bin/sealgate
USER nonroot:nonroot
EXPOSE 6180 9180
ENTRYPOINT ["/usr/local/bin/sealgate"]
CMD ["run", "-c", "/etc/sealgate/sealgate.toml"]
