//! Compiles `agent.proto` into the message types, the `Agent` client and the `Agent` server trait.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=agent.proto");
    tonic_prost_build::configure()
        // `connect(uri)` needs tonic's transport; the host connects through `client::connect_hybrid_vsock`.
        .build_transport(false)
        // Unimplemented methods answer `Unimplemented`: test doubles only implement what they need.
        .generate_default_stubs(true)
        .compile_protos(&["agent.proto"], &["."])?;
    Ok(())
}
