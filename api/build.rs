//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so hosts need
//! no `protoc`), generates tonic/prost code for the public API, and writes the
//! encoded descriptor set that reflection and the REST transcoder read.
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "forkd/v1/common.proto",
    "forkd/v1/snapshot.proto",
    "forkd/v1/sandbox.proto",
    "forkd/v1/workspace.proto",
    "forkd/v1/system.proto",
    "forkd/v1/image.proto",
];

/// E2B's in-sandbox daemon protocol (server/src/e2b).
const E2B_PROTOS: &[&str] = &["e2b/envd/process.proto", "e2b/envd/filesystem.proto"];

fn main() {
    // Read at run time, not with `env!`: a build script compiled in one
    // checkout may be reused from a shared target dir by another.
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let mut compiler = protox::Compiler::new([&root]).expect("proto include path");
    compiler.include_imports(true).include_source_info(true).open_files(&files).expect("compile protos");
    // Encoded by protox itself: going through prost-types would drop the
    // `google.api.http` extensions from the method options.
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out.join("forkd_descriptor.bin"), compiler.encode_file_descriptor_set())
        .expect("write descriptor set");
    let fds = compiler.file_descriptor_set();

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds).expect("generate gRPC code");

    // E2B's envd services: messages only (forkd serves them over the Connect
    // protocol itself), and their own descriptor set for the JSON encoding.
    let e2b: Vec<PathBuf> = E2B_PROTOS.iter().map(|p| root.join(p)).collect();
    let mut compiler = protox::Compiler::new([&root]).expect("proto include path");
    compiler.include_imports(true).open_files(&e2b).expect("compile E2B protos");
    std::fs::write(out.join("e2b_descriptor.bin"), compiler.encode_file_descriptor_set())
        .expect("write E2B descriptor set");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(compiler.file_descriptor_set())
        .expect("generate E2B messages");
}
