//! A memory cgroup for a test: created with a hard limit, entered by the
//! child process before it execs, read for the kernel's OOM kills, removed
//! when dropped. cgroup v1 or v2, whichever the machine has.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A memory cgroup created for the test and removed when dropped.
pub struct Cgroup {
    dir: PathBuf,
    /// 1 or 2.
    pub version: u8,
}

impl Cgroup {
    /// Creates `/sys/fs/cgroup[/memory]/<name>` with `limit_bytes` and no
    /// swap on top of it.
    pub fn create(name: &str, limit_bytes: u64) -> Result<Cgroup, String> {
        Self::create_version(name, limit_bytes, None)
    }

    /// [`Cgroup::create`] in the hierarchy of `version` (1 or 2), or in
    /// whichever the machine has (v1 first) for `None`.
    pub fn create_version(
        name: &str,
        limit_bytes: u64,
        version: Option<u8>,
    ) -> Result<Cgroup, String> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        if version == Some(2) && !v2.exists() {
            return Err("no cgroup v2 hierarchy mounted at /sys/fs/cgroup".into());
        }
        if version != Some(2) && v1.join("memory.limit_in_bytes").exists() {
            let dir = v1.join(name);
            std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            let cg = Cgroup { dir, version: 1 };
            cg.write("memory.limit_in_bytes", &limit_bytes.to_string())?;
            // No swap on top of the limit, where swap accounting exists.
            let _ = cg.write("memory.memsw.limit_in_bytes", &limit_bytes.to_string());
            let _ = cg.write("memory.swappiness", "0");
            Ok(cg)
        } else if version != Some(1) && v2.exists() {
            let root = Path::new("/sys/fs/cgroup");
            let controllers = std::fs::read_to_string(v2).unwrap_or_default();
            if !controllers.split_whitespace().any(|c| c == "memory") {
                return Err("cgroup v2 without the memory controller".into());
            }
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
            let dir = root.join(name);
            std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            let cg = Cgroup { dir, version: 2 };
            cg.write("memory.max", &limit_bytes.to_string())?;
            let _ = cg.write("memory.swap.max", "0");
            Ok(cg)
        } else {
            Err("no cgroup v1 memory controller and no cgroup v2 at /sys/fs/cgroup".into())
        }
    }

    /// Writes `value` to the cgroup's `file`.
    pub fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.dir.join(file), value)
            .map_err(|e| format!("write {value} to {}: {e}", self.dir.join(file).display()))
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The highest charge the cgroup has seen (v1
    /// `memory.max_usage_in_bytes`, v2 `memory.peak`).
    pub fn peak(&self) -> Option<u64> {
        let file = match self.version {
            1 => "memory.max_usage_in_bytes",
            _ => "memory.peak",
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// A command that enters this cgroup before it execs `bin`.
    pub fn command(&self, bin: &Path, args: &[&str]) -> Command {
        let procs = self.dir.join("cgroup.procs");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > '{}' && exec \"$0\" \"$@\"",
                procs.display()
            ))
            .arg(bin)
            .args(args);
        cmd
    }

    /// How many times the kernel's OOM-killer acted in this cgroup.
    pub fn oom_kills(&self) -> Option<u64> {
        let (file, key) = match self.version {
            1 => ("memory.oom_control", "oom_kill"),
            _ => ("memory.events", "oom_kill"),
        };
        let text = std::fs::read_to_string(self.dir.join(file)).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// A cgroup for one test, or `None` after `skip_or_fail` where the machine
/// has none to give.
pub fn cgroup_or_skip(test: &str, limit_bytes: u64) -> Option<Cgroup> {
    match Cgroup::create(
        &format!("memwatch-test-{test}-{}", std::process::id()),
        limit_bytes,
    ) {
        Ok(cg) => Some(cg),
        Err(why) => {
            skip_or_fail(&why);
            None
        }
    }
}

/// Fails the test if `MEMWATCH_REQUIRE_CGROUP=1`; otherwise prints why
/// it is skipped.
pub fn skip_or_fail(why: &str) {
    if std::env::var("MEMWATCH_REQUIRE_CGROUP").as_deref() == Ok("1") {
        panic!("a memory cgroup is required here (MEMWATCH_REQUIRE_CGROUP=1): {why}");
    }
    eprintln!("SKIPPED: cannot create a memory cgroup: {why}");
}
