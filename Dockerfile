# PostgreSQL 15 with tenant_scale preloaded.
#   docker build -t tenant_scale .
#   docker run -e POSTGRES_PASSWORD=secret -p 5432:5432 tenant_scale
#   psql -h localhost -U postgres -c 'CREATE EXTENSION tenant_scale'
#
# A mirror of scripts/setup: the same Debian packages, Rust toolchain, cargo-pgrx and pg_config.
# Change both together. (No Docker engine runs on the development machines, so scripts/setup is what
# the test suite exercises; see README.md.)

ARG PG_MAJOR=15

FROM postgres:15-bookworm AS build
ARG PG_MAJOR
ARG RUST_VERSION=1.95.0
ARG PGRX_VERSION=0.18.1
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      postgresql-server-dev-${PG_MAJOR} libclang-dev clang pkg-config build-essential libssl-dev \
      curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION} \
 && cargo install cargo-pgrx --version ${PGRX_VERSION} --locked \
 && cargo pgrx init --pg${PG_MAJOR} /usr/lib/postgresql/${PG_MAJOR}/bin/pg_config
WORKDIR /src
COPY . .
RUN cargo pgrx package --pg-config /usr/lib/postgresql/${PG_MAJOR}/bin/pg_config --out-dir /out

FROM postgres:15-bookworm
ARG PG_MAJOR
COPY --from=build /out/usr/share/postgresql/${PG_MAJOR}/extension/ /usr/share/postgresql/${PG_MAJOR}/extension/
COPY --from=build /out/usr/lib/postgresql/${PG_MAJOR}/lib/ /usr/lib/postgresql/${PG_MAJOR}/lib/
CMD ["postgres", "-c", "shared_preload_libraries=tenant_scale"]
