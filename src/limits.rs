//! The memory limit the process lives under: the smallest of its cgroup's
//! limit (v2 `memory.max` up the hierarchy, v1 `memory.limit_in_bytes` and
//! `hierarchical_memory_limit`) and physical RAM. Read at start, and again
//! every recheck period by the watchdog while a level is a ratio of it.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Where the effective limit came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitSource {
    /// A cgroup v2 `memory.max`, in the named cgroup directory.
    CgroupV2(PathBuf),
    /// A cgroup v1 memory limit, from the named file.
    CgroupV1(PathBuf),
    /// Physical RAM (`MemTotal` in `/proc/meminfo`); no lower cgroup limit.
    Ram,
}

impl fmt::Display for LimitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitSource::CgroupV2(p) => write!(f, "cgroup v2 memory.max in {}", p.display()),
            LimitSource::CgroupV1(p) => write!(f, "cgroup v1 {}", p.display()),
            LimitSource::Ram => write!(f, "physical RAM"),
        }
    }
}

/// The effective memory limit in bytes and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryLimit {
    /// Bytes.
    pub bytes: u64,
    /// Its source.
    pub source: LimitSource,
}

/// Reads the effective limit of this process from the real filesystem.
pub fn memory_limit() -> Option<MemoryLimit> {
    memory_limit_at(Path::new("/"))
}

/// Reads the effective limit with every path taken under `root` (a fake
/// tree in tests, `/` for real): `proc/self/cgroup`, `proc/self/mountinfo`,
/// `proc/meminfo` and the cgroup mounts they name.
pub fn memory_limit_at(root: &Path) -> Option<MemoryLimit> {
    let ram = ram_bytes(root).map(|bytes| MemoryLimit {
        bytes,
        source: LimitSource::Ram,
    });
    let cgroups = fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
    let mounts = fs::read_to_string(root.join("proc/self/mountinfo")).unwrap_or_default();
    let mut best = ram;
    for candidate in [
        v2_limit(root, &cgroups, &mounts),
        v1_limit(root, &cgroups, &mounts),
    ]
    .into_iter()
    .flatten()
    {
        if best.as_ref().is_none_or(|b| candidate.bytes < b.bytes) {
            best = Some(candidate);
        }
    }
    best
}

fn ram_bytes(root: &Path) -> Option<u64> {
    let meminfo = fs::read_to_string(root.join("proc/meminfo")).ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The mount point of the cgroup filesystem of `kind` (`cgroup2`, or
/// `cgroup` with the `memory` option), and the root of the hierarchy there.
fn mount_point(mounts: &str, want_v2: bool) -> Option<(String, String)> {
    mounts.lines().find_map(|line| {
        // mountinfo: id parent major:minor root mount-point options ... - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split_whitespace();
        let root = l.nth(3)?.to_owned();
        let point = l.next()?.to_owned();
        let mut r = right.split_whitespace();
        let fstype = r.next()?;
        let super_opts = r.nth(1).unwrap_or("");
        let ok = if want_v2 {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && super_opts.split(',').any(|o| o == "memory")
        };
        ok.then_some((point, root))
    })
}

/// The path of this process's cgroup below the mount, from
/// `/proc/self/cgroup`'s line for the hierarchy.
fn own_cgroup(cgroups: &str, want_v2: bool) -> Option<String> {
    cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        let ok = if want_v2 {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == "memory")
        };
        ok.then(|| path.to_owned())
    })
}

/// Joins the process's cgroup path onto the mount, allowing for a mount
/// whose root is itself a sub-hierarchy (as inside a container).
fn cgroup_dir(root: &Path, mount: &str, mount_root: &str, own: &str) -> PathBuf {
    let rel = own.strip_prefix(mount_root).unwrap_or(own);
    let mut dir = root.join(mount.trim_start_matches('/'));
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
    }
    dir
}

fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let n: u64 = t.parse().ok()?;
    // v1 reports "unlimited" as a huge page-aligned number near i64::MAX.
    (n < (1 << 62)).then_some(n)
}

fn v2_limit(root: &Path, cgroups: &str, mounts: &str) -> Option<MemoryLimit> {
    let (mount, mount_root) = mount_point(mounts, true)?;
    let own = own_cgroup(cgroups, true)?;
    let top = root.join(mount.trim_start_matches('/'));
    let mut dir = cgroup_dir(root, &mount, &mount_root, &own);
    let mut best: Option<MemoryLimit> = None;
    // Walk up to the mount: the smallest memory.max on the way applies.
    loop {
        if let Some(bytes) = fs::read_to_string(dir.join("memory.max"))
            .ok()
            .as_deref()
            .and_then(parse_limit)
        {
            if best.as_ref().is_none_or(|b| bytes < b.bytes) {
                best = Some(MemoryLimit {
                    bytes,
                    source: LimitSource::CgroupV2(dir.clone()),
                });
            }
        }
        if dir == top || !dir.pop() || !dir.starts_with(&top) {
            break;
        }
    }
    best
}

fn v1_limit(root: &Path, cgroups: &str, mounts: &str) -> Option<MemoryLimit> {
    let (mount, mount_root) = mount_point(mounts, false)?;
    let own = own_cgroup(cgroups, false)?;
    let dir = cgroup_dir(root, &mount, &mount_root, &own);
    let direct = fs::read_to_string(dir.join("memory.limit_in_bytes"))
        .ok()
        .as_deref()
        .and_then(parse_limit)
        .map(|bytes| MemoryLimit {
            bytes,
            source: LimitSource::CgroupV1(dir.join("memory.limit_in_bytes")),
        });
    let hierarchical = fs::read_to_string(dir.join("memory.stat"))
        .ok()
        .and_then(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix("hierarchical_memory_limit "))
                .and_then(parse_limit)
        })
        .map(|bytes| MemoryLimit {
            bytes,
            source: LimitSource::CgroupV1(dir.join("memory.stat")),
        });
    match (direct, hierarchical) {
        (Some(a), Some(b)) => Some(if b.bytes < a.bytes { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The memory cgroup whose hard limit applies to this process, for the
/// kernel trigger (`crate::kernel_trigger`): its directory, its version
/// and the limit. `None` where no cgroup sets a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LimitingCgroup {
    /// 1 or 2.
    pub(crate) version: u8,
    /// The cgroup's directory (v1: the process's own memory cgroup).
    pub(crate) dir: PathBuf,
    /// Its limit in bytes (v1: the smaller of its own and the hierarchy's).
    pub(crate) limit: u64,
}

/// [`LimitingCgroup`] with every path taken under `root`, as in
/// [`memory_limit_at`]. The v2 cgroup is the one up the hierarchy with the
/// smallest `memory.max`; where both hierarchies limit, the smaller wins.
pub(crate) fn limiting_cgroup_at(root: &Path) -> Option<LimitingCgroup> {
    let cgroups = fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
    let mounts = fs::read_to_string(root.join("proc/self/mountinfo")).unwrap_or_default();
    let v2 = v2_limit(root, &cgroups, &mounts).and_then(|l| match l.source {
        LimitSource::CgroupV2(dir) => Some(LimitingCgroup {
            version: 2,
            dir,
            limit: l.bytes,
        }),
        _ => None,
    });
    let v1 = v1_limit(root, &cgroups, &mounts).and_then(|l| match l.source {
        LimitSource::CgroupV1(file) => Some(LimitingCgroup {
            version: 1,
            dir: file.parent()?.to_path_buf(),
            limit: l.bytes,
        }),
        _ => None,
    });
    match (v2, v1) {
        (Some(a), Some(b)) => Some(if b.limit < a.limit { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake filesystem root with the given files.
    fn tree(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("memwatch-limits-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (path, text) in files {
            let p = root.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        root
    }

    const MEMINFO: &str = "MemTotal:       24576000 kB\nMemFree:        1000 kB\n";

    #[test]
    fn v2_smallest_memory_max_up_the_hierarchy() {
        let root = tree(
            "v2",
            &[
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "0::/kubepods/pod1/app\n"),
                (
                    "proc/self/mountinfo",
                    "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
                ),
                ("sys/fs/cgroup/kubepods/memory.max", "max\n"),
                ("sys/fs/cgroup/kubepods/pod1/memory.max", "536870912\n"),
                ("sys/fs/cgroup/kubepods/pod1/app/memory.max", "max\n"),
            ],
        );
        let l = memory_limit_at(&root).unwrap();
        assert_eq!(l.bytes, 536_870_912);
        assert_eq!(
            l.source,
            LimitSource::CgroupV2(root.join("sys/fs/cgroup/kubepods/pod1"))
        );
        assert_eq!(
            limiting_cgroup_at(&root),
            Some(LimitingCgroup {
                version: 2,
                dir: root.join("sys/fs/cgroup/kubepods/pod1"),
                limit: 536_870_912
            })
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v2_unlimited_falls_back_to_ram() {
        let root = tree(
            "v2-unlimited",
            &[
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "0::/app\n"),
                (
                    "proc/self/mountinfo",
                    "30 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
                ),
                ("sys/fs/cgroup/app/memory.max", "max\n"),
            ],
        );
        let l = memory_limit_at(&root).unwrap();
        assert_eq!(l.bytes, 24_576_000 * 1024);
        assert_eq!(l.source, LimitSource::Ram);
        assert_eq!(limiting_cgroup_at(&root), None, "RAM is not a cgroup");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v1_limit_and_hierarchical_limit() {
        let mountinfo = "40 25 0:35 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                         41 25 0:36 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        let root = tree(
            "v1",
            &[
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "5:cpu:/\n4:memory:/docker/abc\n"),
                ("proc/self/mountinfo", mountinfo),
                (
                    "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
                (
                    "sys/fs/cgroup/memory/docker/abc/memory.stat",
                    "cache 0\nhierarchical_memory_limit 268435456\n",
                ),
            ],
        );
        let l = memory_limit_at(&root).unwrap();
        assert_eq!(l.bytes, 268_435_456);
        assert!(matches!(l.source, LimitSource::CgroupV1(_)));
        assert_eq!(
            limiting_cgroup_at(&root),
            Some(LimitingCgroup {
                version: 1,
                dir: root.join("sys/fs/cgroup/memory/docker/abc"),
                limit: 268_435_456
            })
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn v1_inside_a_container_whose_mount_root_is_its_cgroup() {
        // In a container the mount's root is the container's own cgroup and
        // /proc/self/cgroup names the full path.
        let root = tree(
            "v1-container",
            &[
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "4:memory:/docker/abc\n"),
                (
                    "proc/self/mountinfo",
                    "40 25 0:35 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n",
                ),
                ("sys/fs/cgroup/memory/memory.limit_in_bytes", "1073741824\n"),
            ],
        );
        assert_eq!(memory_limit_at(&root).unwrap().bytes, 1 << 30);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn nothing_readable_is_none() {
        let root = tree("empty", &[("proc/self/cgroup", "")]);
        assert_eq!(memory_limit_at(&root), None);
        let _ = fs::remove_dir_all(&root);
    }
}
