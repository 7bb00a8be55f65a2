//! `fake-dagger`: a behavioural model of the Dagger CLI and engine for tests (see the
//! `scabbard_fake_engine` library).

fn main() {
    std::process::exit(scabbard_fake_engine::fake_dagger_main(
        std::env::args().collect(),
    ));
}
