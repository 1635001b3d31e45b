# Sourced by the scripts: one cargo target directory outside the clone, shared by the demo, the
# tests and every clone, so heavy dependencies (librdkafka, the embedded broker) build once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gridtalk/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"
