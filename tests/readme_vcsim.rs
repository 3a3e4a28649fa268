//! The README's by-hand run against plain vcsim, as a newcomer types it:
//! the `provision` example with the README's flags reaches "VM ready"
//! (vcsim records no guest customization, so the flags say not to wait for
//! its outcome). Without `--customization-timeout-secs 0` it would wait out
//! the ten-minute default and fail "never started".
//!
//! Needs vcsim (`VCSIM_BIN`, default `target/vcsim/bin/vcsim`); skips
//! without it (in `DVMM_SKIP_LOG`), unless `DVMM_REQUIRE_SERVICES=1`.

mod processes;

use std::process::Command;
use std::time::Duration;

use processes::*;

#[test]
fn the_readme_provision_command_reaches_ready_on_plain_vcsim() {
    let vcsim = vcsim_bin();
    if !vcsim.exists() {
        return skip(&format!(
            "vcsim not found at {} (run scripts/build-vcsim.sh or set VCSIM_BIN)",
            vcsim.display()
        ));
    }
    let bin = example_binary("provision");
    let (_vcsim, url) = start_vcsim(&vcsim);
    let mut provision = Command::new(bin);
    provision
        .args(["--vcenter-url", &url])
        .args(["--username", "user", "--password", "pass", "--insecure"])
        .args(["--template", "DC0_H0_VM0", "--ip-timeout-secs", "5"])
        .args(["--customization-timeout-secs", "0"])
        .env("RUST_LOG", "error");
    // The IP wait is 5 s; everything else takes a second or two.
    let out = output_within(provision, Duration::from_secs(120), "the provision example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "provision exited with {}:\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("VM ready (IP pending)"),
        "no Ready entry:\n{stdout}"
    );
}
