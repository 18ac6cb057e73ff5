# Build: docker build -t ghcr.io/keyward/keyward:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out && cp target/release/keyward target/release/kubectl-keyward /out/

# distroless/cc: glibc for the bundled SQLite, CA certificates and tzdata for
# IANA time zones, no shell, and the nonroot user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keyward /keyward
COPY --from=build /out/kubectl-keyward /kubectl-keyward
USER 65532:65532
ENTRYPOINT ["/keyward"]
CMD ["run"]
