//! Compiles `proto/forkd/agent/v1/agent.proto` with a pure-Rust protobuf
//! compiler, so no system `protoc` is needed.
fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("forkd/agent/v1/agent.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root]).expect("compile agent.proto");
    prost_build::Config::new().compile_fds(fds).expect("generate agent protocol code");
}
