//! Unit tests for the hierarchies, through a recording double of [`CgroupFs`].

use super::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// One call a [`Recorder`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    CreateDirAll(PathBuf),
    Write(PathBuf, String),
    Read(PathBuf),
    Exists(PathBuf),
    RemoveDir(PathBuf),
    ReadDir(PathBuf),
    Kill(i32, i32),
    RestrictDevices(PathBuf, Vec<devices::DeviceRule>),
}

#[derive(Debug, Default)]
struct State {
    ops: Vec<Op>,
    files: BTreeMap<PathBuf, String>,
    dirs: BTreeSet<PathBuf>,
}

/// A [`CgroupFs`] double: records every call in order, serves reads from canned file
/// contents, and mimics the kernel where the code under test depends on it: a new group
/// gets the `interface` files, writing `1` to `cgroup.kill` empties that group's
/// `cgroup.procs`, SIGKILL takes a pid out of every `cgroup.procs`, and a group with
/// processes cannot be removed.
#[derive(Debug, Default)]
struct Recorder {
    state: Mutex<State>,
    interface: Vec<&'static str>,
}

impl Recorder {
    fn new(interface: &[&'static str]) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            interface: interface.to_vec(),
        })
    }

    fn set(&self, path: impl Into<PathBuf>, contents: &str) {
        let path = path.into();
        let mut state = self.state.lock().unwrap();
        for dir in path.ancestors().skip(1) {
            state.dirs.insert(dir.to_path_buf());
        }
        state.files.insert(path, contents.to_string());
    }

    fn ops(&self) -> Vec<Op> {
        self.state.lock().unwrap().ops.clone()
    }

    fn clear_ops(&self) {
        self.state.lock().unwrap().ops.clear();
    }

    fn writes(&self) -> Vec<(PathBuf, String)> {
        self.ops()
            .into_iter()
            .filter_map(|op| match op {
                Op::Write(path, value) => Some((path, value)),
                _ => None,
            })
            .collect()
    }

    fn kills(&self) -> Vec<(i32, i32)> {
        self.ops()
            .into_iter()
            .filter_map(|op| match op {
                Op::Kill(pid, signal) => Some((pid, signal)),
                _ => None,
            })
            .collect()
    }

    fn file(&self, path: impl AsRef<Path>) -> Option<String> {
        self.state.lock().unwrap().files.get(path.as_ref()).cloned()
    }

    fn has_dir(&self, path: impl AsRef<Path>) -> bool {
        self.state.lock().unwrap().dirs.contains(path.as_ref())
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, path.display().to_string())
}

impl CgroupFs for Recorder {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.ops.push(Op::CreateDirAll(path.to_path_buf()));
        for dir in path.ancestors() {
            if state.dirs.insert(dir.to_path_buf()) {
                for file in &self.interface {
                    state.files.insert(dir.join(file), String::new());
                }
            }
        }
        Ok(())
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state
            .ops
            .push(Op::Write(path.to_path_buf(), value.to_string()));
        if path.file_name() == Some("cgroup.kill".as_ref()) && value == "1" {
            let procs = path.with_file_name("cgroup.procs");
            state.files.insert(procs, String::new());
        }
        state.files.insert(path.to_path_buf(), value.to_string());
        Ok(())
    }

    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        let mut state = self.state.lock().unwrap();
        state.ops.push(Op::Read(path.to_path_buf()));
        state
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| not_found(path))
    }

    fn exists(&self, path: &Path) -> bool {
        let mut state = self.state.lock().unwrap();
        state.ops.push(Op::Exists(path.to_path_buf()));
        state.files.contains_key(path) || state.dirs.contains(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.ops.push(Op::RemoveDir(path.to_path_buf()));
        let procs = state.files.get(&path.join("cgroup.procs"));
        if procs.is_some_and(|p| !p.trim().is_empty()) {
            return Err(io::Error::new(io::ErrorKind::ResourceBusy, "busy"));
        }
        if !state.dirs.remove(path) {
            return Err(not_found(path));
        }
        state.files.retain(|file, _| file.parent() != Some(path));
        Ok(())
    }

    fn read_dir_names(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut state = self.state.lock().unwrap();
        state.ops.push(Op::ReadDir(path.to_path_buf()));
        if !state.dirs.contains(path) {
            return Err(not_found(path));
        }
        Ok(state
            .dirs
            .iter()
            .filter(|dir| dir.parent() == Some(path))
            .filter_map(|dir| Some(dir.file_name()?.to_str()?.to_string()))
            .collect())
    }

    fn kill(&self, pid: i32, signal: i32) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.ops.push(Op::Kill(pid, signal));
        if signal == libc::SIGKILL {
            for (path, contents) in state.files.iter_mut() {
                if path.file_name() == Some("cgroup.procs".as_ref()) {
                    *contents = contents
                        .lines()
                        .filter(|line| line.trim() != pid.to_string())
                        .map(|line| format!("{line}\n"))
                        .collect();
                }
            }
        }
        Ok(())
    }

    fn restrict_devices(&self, dir: &Path, rules: &[devices::DeviceRule]) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state
            .ops
            .push(Op::RestrictDevices(dir.to_path_buf(), rules.to_vec()));
        Ok(())
    }
}

/// The files a v2 kernel makes in every new group, as far as these tests need.
const V2_FILES: [&str; 4] = [
    "cgroup.procs",
    "cgroup.kill",
    "memory.swap.max",
    "cgroup.subtree_control",
];

const MEMBERSHIP_V2: &str = "0::/process_api/abc\n";

fn limits() -> Limits {
    Limits {
        memory: Some(256 << 20),
        cpu: Some(0.5),
        pids: Some(64),
        devices: Vec::new(),
    }
}

fn v2_group(fs: &Arc<Recorder>) -> Group {
    let v2 = V2::detect_in(Path::new("/cg"), MEMBERSHIP_V2, fs.clone()).unwrap();
    let group = v2.create("c1", &limits()).unwrap();
    fs.clear_ops();
    group
}

#[test]
fn groups_go_beneath_the_process_own_memory_group() {
    let root = tempfile::tempdir().unwrap();
    for controller in V1_CONTROLLERS {
        fs::create_dir_all(root.path().join(controller)).unwrap();
        fs::write(root.path().join(controller).join("cgroup.procs"), "").unwrap();
    }
    let membership = "4:memory:/process_api/abc\n1:cpu,cpuacct:/\n8:pids:/\n0::/\n";
    let v1 = V1::detect_in(root.path(), membership).unwrap();
    let limits = Limits {
        memory: Some(256 << 20),
        cpu: Some(0.5),
        pids: Some(64),
        devices: Vec::new(),
    };
    let group = v1.create("c1", &limits).unwrap();
    let memory = root.path().join("memory/process_api/abc/lode/c1");
    assert_eq!(
        fs::read_to_string(memory.join("memory.limit_in_bytes")).unwrap(),
        "268435456"
    );
    let cpu = root.path().join("cpu/lode/c1");
    assert_eq!(
        fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(),
        "50000"
    );
    assert_eq!(
        fs::read_to_string(cpu.join("cpu.cfs_period_us")).unwrap(),
        "100000"
    );
    assert_eq!(
        fs::read_to_string(root.path().join("pids/lode/c1/pids.max")).unwrap(),
        "64"
    );
    // Every device refused, then the container's own allowed (a plain file keeps the last
    // write; the recording double below checks the order).
    assert_eq!(
        fs::read_to_string(root.path().join("devices/lode/c1/devices.deny")).unwrap(),
        "a"
    );
    assert_eq!(group.procs_files().len(), 4);
    assert_eq!(
        LimitHit::OutOfMemory { limit: 256 << 20 }.to_string(),
        "killed: out of memory (limit 256 MiB)"
    );
}

#[test]
fn v2_create_enables_controllers_then_writes_limits_beneath_own_group() {
    let fs = Recorder::new(&V2_FILES);
    let v2 = V2::detect_in(Path::new("/cg"), MEMBERSHIP_V2, fs.clone()).unwrap();
    let group = v2.create("c1", &limits()).unwrap();
    let lode = PathBuf::from("/cg/process_api/abc/lode");
    let dir = lode.join("c1");
    let w = |file: &str, value: &str| (dir.join(file), value.to_string());
    assert_eq!(
        fs.writes(),
        [
            (
                lode.join("cgroup.subtree_control"),
                "+memory +cpu +pids".to_string()
            ),
            w("memory.max", "268435456"),
            w("memory.swap.max", "0"),
            w("cpu.max", "50000 100000"),
            w("pids.max", "64"),
        ]
    );
    // The parent exists and has its controllers enabled before the child is made.
    let ops = fs.ops();
    let position = |op: &Op| ops.iter().position(|o| o == op).unwrap();
    assert!(
        position(&Op::CreateDirAll(lode.clone()))
            < position(&Op::Write(
                lode.join("cgroup.subtree_control"),
                "+memory +cpu +pids".into()
            ))
    );
    assert!(
        position(&Op::Write(
            lode.join("cgroup.subtree_control"),
            "+memory +cpu +pids".into()
        )) < position(&Op::CreateDirAll(dir.clone()))
    );
    // v2 has no devices file: the group gets the allow-list as a device program.
    assert!(ops.contains(&Op::RestrictDevices(
        dir.clone(),
        devices::container_rules()
    )));
    assert_eq!(group.procs_files(), [dir.join("cgroup.procs")]);
}

#[test]
fn v2_create_skips_swap_without_swap_accounting_and_unset_limits() {
    let fs = Recorder::new(&["cgroup.procs"]);
    let v2 = V2::detect_in(Path::new("/cg"), "0::/\n", fs.clone()).unwrap();
    let limits = Limits {
        memory: Some(1 << 20),
        cpu: Some(0.001),
        pids: None,
        devices: Vec::new(),
    };
    v2.create("c2", &limits).unwrap();
    let dir = PathBuf::from("/cg/lode/c2");
    assert_eq!(
        fs.writes()[1..],
        [
            (dir.join("memory.max"), "1048576".to_string()),
            // The kernel's minimum quota, not the 100 µs 0.001 cores would give.
            (dir.join("cpu.max"), "1000 100000".to_string()),
        ]
    );
}

#[test]
fn v2_detect_needs_the_unified_membership_line() {
    let fs = Recorder::new(&[]);
    let err = V2::detect_in(Path::new("/cg"), "4:memory:/x\n", fs).unwrap_err();
    assert!(err.to_string().contains("0::/path"), "{err}");
}

#[test]
fn v2_limit_hit_reads_memory_and_pids_events() {
    let fs = Recorder::new(&V2_FILES);
    let group = v2_group(&fs);
    let dir = PathBuf::from("/cg/process_api/abc/lode/c1");
    fs.set(dir.join("memory.events"), "low 0\nhigh 0\nmax 4\noom 0\n");
    fs.set(dir.join("pids.events"), "max 0\n");
    assert_eq!(group.limit_hit(), None);

    fs.set(
        dir.join("memory.events"),
        "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
    );
    let hit = group.limit_hit().unwrap();
    assert_eq!(hit, LimitHit::OutOfMemory { limit: 256 << 20 });
    assert_eq!(hit.to_string(), "killed: out of memory (limit 256 MiB)");
    assert!(fs.ops().contains(&Op::Read(dir.join("memory.events"))));

    fs.set(dir.join("memory.events"), "oom_kill 0\n");
    fs.set(dir.join("pids.events"), "max 3\n");
    assert_eq!(group.limit_hit(), Some(LimitHit::Pids { limit: 64 }));
}

#[test]
fn v2_kill_all_writes_cgroup_kill_when_present() {
    let fs = Recorder::new(&V2_FILES);
    let group = v2_group(&fs);
    let dir = PathBuf::from("/cg/process_api/abc/lode/c1");
    fs.set(dir.join("cgroup.procs"), "10\n11\n");
    group.kill_all();
    assert_eq!(fs.writes(), [(dir.join("cgroup.kill"), "1".to_string())]);
    assert_eq!(fs.kills(), []);
    assert!(group.pids().is_empty());
}

#[test]
fn v2_kill_all_signals_each_pid_without_cgroup_kill() {
    // A kernel before 5.14: no cgroup.kill.
    let fs = Recorder::new(&["cgroup.procs"]);
    let group = v2_group(&fs);
    let dir = PathBuf::from("/cg/process_api/abc/lode/c1");
    fs.set(dir.join("cgroup.procs"), "10\n11\n");
    group.kill_all();
    assert_eq!(fs.writes(), []);
    assert_eq!(fs.kills(), [(10, libc::SIGKILL), (11, libc::SIGKILL)]);
    assert!(fs.ops().contains(&Op::Exists(dir.join("cgroup.kill"))));
    assert_eq!(fs.file(dir.join("cgroup.procs")).unwrap(), "");
}

#[test]
fn v2_remove_kills_then_removes_the_group() {
    let fs = Recorder::new(&V2_FILES);
    let group = v2_group(&fs);
    let dir = PathBuf::from("/cg/process_api/abc/lode/c1");
    fs.set(dir.join("cgroup.procs"), "10\n");
    group.remove();
    let ops = fs.ops();
    let kill = Op::Write(dir.join("cgroup.kill"), "1".into());
    let rmdir = Op::RemoveDir(dir.clone());
    let kill_at = ops.iter().position(|o| *o == kill).unwrap();
    let rmdir_at = ops.iter().position(|o| *o == rmdir).unwrap();
    assert!(kill_at < rmdir_at);
    assert!(!fs.has_dir(&dir));
}

#[test]
fn v2_clean_leftovers_kills_and_removes_the_groups_with_its_prefix() {
    let fs = Recorder::new(&V2_FILES);
    let lode = PathBuf::from("/cg/process_api/abc/lode");
    fs.set(lode.join("s1-a/cgroup.procs"), "10\n");
    fs.set(lode.join("s1-a/cgroup.kill"), "");
    fs.set(lode.join("s1-b/cgroup.procs"), "");
    fs.set(lode.join("s1-b/cgroup.kill"), "");
    fs.set(lode.join("s2-c/cgroup.procs"), "11\n");
    fs.set(lode.join("s2-c/cgroup.kill"), "");
    let v2 = V2::detect_in(Path::new("/cg"), MEMBERSHIP_V2, fs.clone()).unwrap();
    v2.clean_leftovers("s1-");
    let removed: Vec<_> = fs
        .ops()
        .into_iter()
        .filter(|op| matches!(op, Op::RemoveDir(_)))
        .collect();
    assert_eq!(
        removed,
        [
            Op::RemoveDir(lode.join("s1-a")),
            Op::RemoveDir(lode.join("s1-b"))
        ]
    );
    assert!(
        fs.writes()
            .contains(&(lode.join("s1-a/cgroup.kill"), "1".to_string()))
    );
    assert!(!fs.has_dir(lode.join("s1-a")));
    assert!(!fs.has_dir(lode.join("s1-b")));
    // Another server's group is not touched.
    assert!(fs.has_dir(lode.join("s2-c")));
    assert!(fs.has_dir(&lode));
}

#[test]
fn detect_picks_v1_without_cgroup_controllers() {
    let fs = Recorder::new(&[]);
    for controller in V1_CONTROLLERS {
        fs.set(format!("/cg/{controller}/cgroup.procs"), "");
    }
    let membership = "4:memory:/process_api/abc\n1:cpu,cpuacct:/\n8:pids:/\n0::/\n";
    let hierarchy = detect_in(Path::new("/cg"), membership, fs.clone()).unwrap();
    assert!(
        fs.ops()
            .contains(&Op::Exists("/cg/cgroup.controllers".into()))
    );
    // A container given a GPU: its node joins the allow-list, after the container's own.
    let gpu = devices::DeviceGrant {
        name: "nvidia0".into(),
        major: 195,
        minor: 0,
    };
    let limits = Limits {
        devices: vec![gpu],
        ..limits()
    };
    let group = hierarchy.create("c1", &limits).unwrap();
    assert_eq!(
        group.procs_files(),
        [
            PathBuf::from("/cg/memory/process_api/abc/lode/c1/cgroup.procs"),
            PathBuf::from("/cg/cpu/lode/c1/cgroup.procs"),
            PathBuf::from("/cg/pids/lode/c1/cgroup.procs"),
            PathBuf::from("/cg/devices/lode/c1/cgroup.procs"),
        ]
    );
    let device_writes: Vec<_> = fs
        .writes()
        .into_iter()
        .filter(|(path, _)| path.starts_with("/cg/devices"))
        .map(|(path, value)| {
            (
                path.file_name().unwrap().to_str().unwrap().to_string(),
                value,
            )
        })
        .collect();
    assert_eq!(
        device_writes[0],
        ("devices.deny".to_string(), "a".to_string())
    );
    assert_eq!(
        device_writes[1..]
            .iter()
            .map(|(file, value)| format!("{file} {value}"))
            .collect::<Vec<_>>(),
        devices::container_rules()
            .iter()
            .map(|rule| format!("devices.allow {}", rule.v1_line()))
            .chain(["devices.allow c 195:0 rwm".to_string()])
            .collect::<Vec<_>>()
    );
    assert!(fs.writes().contains(&(
        "/cg/memory/process_api/abc/lode/c1/memory.limit_in_bytes".into(),
        "268435456".to_string()
    )));
}

#[test]
fn detect_picks_v2_when_cgroup_controllers_lists_all_three() {
    let fs = Recorder::new(&V2_FILES);
    fs.set(
        "/cg/cgroup.controllers",
        "cpuset cpu io memory hugetlb pids rdma\n",
    );
    let hierarchy = detect_in(Path::new("/cg"), MEMBERSHIP_V2, fs.clone()).unwrap();
    let group = hierarchy.create("c1", &limits()).unwrap();
    assert_eq!(
        group.procs_files(),
        [PathBuf::from("/cg/process_api/abc/lode/c1/cgroup.procs")]
    );
    assert!(fs.writes().contains(&(
        "/cg/process_api/abc/lode/c1/cpu.max".into(),
        "50000 100000".to_string()
    )));
}

#[test]
fn detect_names_the_missing_v2_controller_and_where_it_looked() {
    let fs = Recorder::new(&[]);
    fs.set("/cg/cgroup.controllers", "cpuset cpu io memory\n");
    let err = detect_in(Path::new("/cg"), MEMBERSHIP_V2, fs).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("v2 pids controller"), "{message}");
    assert!(message.contains("/cg/cgroup.controllers"), "{message}");
    // And why v1 did not do either.
    assert!(message.contains("v1 memory controller"), "{message}");
    assert!(message.contains("/cg/memory"), "{message}");
}
