//! Compiles `proto/forkd/agent/v1/agent.proto` with a pure-Rust protobuf
//! compiler, so no system `protoc` is needed.
fn main() {
    // Read at run time, not with `env!`: a build script compiled in one
    // checkout may be reused from a shared target dir by another.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = std::path::Path::new(&manifest_dir).join("../../proto");
    let file = root.join("forkd/agent/v1/agent.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root]).expect("compile agent.proto");
    prost_build::Config::new().compile_fds(fds).expect("generate agent protocol code");
}
