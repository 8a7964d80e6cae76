//! The volume part of the benchmark, (v): `pen exec NAME -- true` on a stopped VM restored
//! from the image's snapshot with no volume and with 3 volumes attached, alternated
//! repetition by repetition in one run. Volumes are attached after the snapshot point (one
//! snapshot serves both VMs); the difference is what binding, probing and mounting 3
//! squashfs disks adds to a start.

use std::time::Duration;

use anyhow::bail;

use crate::{median, ms, snapshots, Env};

const NO_VOLUMES: &str = "bench-v0";
const THREE_VOLUMES: &str = "bench-v3";

pub struct Figures {
    pub exec0: Duration,
    pub exec3: Duration,
    pub ready0: Duration,
    pub ready3: Duration,
}

pub fn measure(env: &Env, reps: usize) -> anyhow::Result<Figures> {
    let ws = env.ws.to_string_lossy().into_owned();
    let memory = env.opts.memory.to_string();
    // Three small volumes: the cost measured is attaching, not reading.
    for name in ["bench-a", "bench-b", "bench-c"] {
        let src = env.ws.join(format!("src-{name}"));
        std::fs::create_dir_all(src.join("sub"))?;
        std::fs::write(src.join("sub/file"), name)?;
        let src = src.to_string_lossy().into_owned();
        env.timed(&["volume", "create", name, "--from", &src])?;
    }
    let three = [
        "--volume",
        "bench-a:/opt/a",
        "--volume",
        "bench-b:/opt/b",
        "--volume",
        "bench-c:/opt/c",
    ];
    // First boots (overlay format; the snapshot saved if there is none): not measured.
    let base = ["--dir", ws.as_str(), "--memory", memory.as_str()];
    let mut args = vec!["exec", NO_VOLUMES];
    args.extend(base);
    args.extend(["--", "true"]);
    env.timed(&args)?;
    env.wait_stopped_vm(NO_VOLUMES)?;
    let mut args = vec!["exec", THREE_VOLUMES];
    args.extend(base);
    args.extend(three);
    args.extend(["--", "test", "-f", "/opt/c/sub/file"]);
    env.timed(&args)?;
    env.wait_stopped_vm(THREE_VOLUMES)?;

    let (mut exec0, mut exec3, mut ready0, mut ready3) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        for (name, execs, readies) in [
            (NO_VOLUMES, &mut exec0, &mut ready0),
            (THREE_VOLUMES, &mut exec3, &mut ready3),
        ] {
            execs.push(env.timed(&["exec", name, "--", "true"])?);
            let log = env.home.join("vms").join(name).join("supervisor.log");
            if !snapshots::restored(&log) {
                bail!("{name} booted cold; see {}", log.display());
            }
            readies.push(snapshots::ready_ms(&log)?);
            env.wait_stopped_vm(name)?;
        }
    }
    eprintln!("pen-bench: (v) 0 volumes {exec0:?} (ready {ready0:?})");
    eprintln!("pen-bench: (v) 3 volumes {exec3:?} (ready {ready3:?})");
    for name in [NO_VOLUMES, THREE_VOLUMES] {
        env.timed(&["delete", "--force", name])?;
    }
    Ok(Figures {
        exec0: median(exec0),
        exec3: median(exec3),
        ready0: median(ready0),
        ready3: median(ready3),
    })
}

/// Table rows for [`Figures`].
pub fn print(f: &Figures) {
    let diff = |a: Duration, b: Duration| a.as_secs_f64() * 1000.0 - b.as_secs_f64() * 1000.0;
    println!(
        "| (v) snapshot `pen exec -- true`: 0 / 3 volumes (difference, target < 30 ms) | {} / {} ({:+.0} ms) |",
        ms(f.exec0),
        ms(f.exec3),
        diff(f.exec3, f.exec0)
    );
    println!(
        "| (v) supervisor start to guest Ready: 0 / 3 volumes (difference) | {} / {} ({:+.0} ms) |",
        ms(f.ready0),
        ms(f.ready3),
        diff(f.ready3, f.ready0)
    );
}
