//! The commit sidecar: not written yet (issue 3). This skeleton keeps the
//! workspace buildable and refuses to pretend it does anything.
fn main() {
    eprintln!("snapshot-sidecar: not implemented yet");
    std::process::exit(2);
}
