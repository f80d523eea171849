//! Who this process is in the job, read from the environment the launcher
//! left: torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, as `launch_local` also
//! sets them) or SLURM's (`srun` sets `SLURM_PROCID` & co. and no master
//! address, so it is derived from the node list). With neither, the process
//! is alone: rank 0 of 1.
//!
//! torchrun's variables win when both are present, because `srun torchrun`
//! is a common way to start jobs and then torchrun's view is the real one.

use std::collections::HashMap;

use super::DistError;

/// Rank, world and rendezvous address of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Index of this process on its node; picks the device.
    pub local_rank: usize,
    pub local_world_size: usize,
    /// Index of this process's node in the job.
    pub node_rank: usize,
    /// Where rank 0 hosts the rendezvous store.
    pub master_addr: String,
    pub master_port: u16,
}

/// Which convention the variables came from (for the startup log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    Torchrun,
    Slurm,
    Single,
}

impl DistEnv {
    /// One process, no peers.
    pub fn single() -> Self {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, DistError> {
        // Non-UTF-8 values cannot be numbers or host names; dropping them makes
        // the variable count as unset, which then fails with its name.
        let vars: HashMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Self::from_vars(&vars)
    }

    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, DistError> {
        Ok(Self::from_vars_with_source(vars)?.0)
    }

    pub fn from_vars_with_source(
        vars: &HashMap<String, String>,
    ) -> Result<(Self, EnvSource), DistError> {
        let env = if vars.contains_key("RANK") || vars.contains_key("WORLD_SIZE") {
            (torchrun(vars)?, EnvSource::Torchrun)
        } else if vars.contains_key("SLURM_PROCID") {
            (slurm(vars)?, EnvSource::Slurm)
        } else {
            (Self::single(), EnvSource::Single)
        };
        env.0.validate()?;
        Ok(env)
    }

    /// `host:port` of the rendezvous store.
    pub fn master(&self) -> String {
        if self.master_addr.contains(':') {
            // A bare IPv6 address needs brackets to carry a port.
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }

    fn validate(&self) -> Result<(), DistError> {
        let bad = |var: &str, value: usize, reason: String| DistError::BadEnv {
            var: var.into(),
            value: value.to_string(),
            reason,
        };
        if self.world_size == 0 {
            return Err(bad("WORLD_SIZE", 0, "must be at least 1".into()));
        }
        if self.rank >= self.world_size {
            return Err(bad(
                "RANK",
                self.rank,
                format!("must be below the world size {}", self.world_size),
            ));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size {
            return Err(bad(
                "LOCAL_WORLD_SIZE",
                self.local_world_size,
                format!("must be between 1 and the world size {}", self.world_size),
            ));
        }
        if self.local_rank >= self.local_world_size {
            return Err(bad(
                "LOCAL_RANK",
                self.local_rank,
                format!(
                    "must be below the local world size {}",
                    self.local_world_size
                ),
            ));
        }
        Ok(())
    }
}

fn torchrun(vars: &HashMap<String, String>) -> Result<DistEnv, DistError> {
    const WHY: &str = "when RANK or WORLD_SIZE is set (torchrun convention)";
    let rank = parse_required::<usize>(vars, "RANK", WHY)?;
    let world_size = parse_required::<usize>(vars, "WORLD_SIZE", WHY)?;
    let local_rank = parse_required::<usize>(vars, "LOCAL_RANK", WHY)?;
    let local_world_size = parse_required::<usize>(vars, "LOCAL_WORLD_SIZE", WHY)?;
    let (master_addr, master_port) = if world_size > 1 {
        let addr = required(vars, "MASTER_ADDR", WHY)?.to_string();
        (addr, parse_required::<u16>(vars, "MASTER_PORT", WHY)?)
    } else {
        // A world of one never rendezvous; do not demand an address for it.
        let addr = vars.get("MASTER_ADDR").cloned();
        let port = parse_optional::<u16>(vars, "MASTER_PORT")?;
        (
            addr.unwrap_or_else(|| "127.0.0.1".into()),
            port.unwrap_or(0),
        )
    };
    // torchrun exports GROUP_RANK (the node's index); without it, assume the
    // homogeneous layout torchrun produces: consecutive ranks per node.
    let node_rank = match parse_optional::<usize>(vars, "GROUP_RANK")? {
        Some(n) => n,
        None => rank / local_world_size.max(1),
    };
    Ok(DistEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        node_rank,
        master_addr,
        master_port,
    })
}

fn slurm(vars: &HashMap<String, String>) -> Result<DistEnv, DistError> {
    const WHY: &str = "when SLURM_PROCID is set (SLURM convention)";
    let rank = parse_required::<usize>(vars, "SLURM_PROCID", WHY)?;
    let world_size = parse_required::<usize>(vars, "SLURM_NTASKS", WHY)?;
    let local_rank = parse_required::<usize>(vars, "SLURM_LOCALID", WHY)?;

    // Tasks on each node of this step, in node order. srun sets
    // SLURM_STEP_TASKS_PER_NODE and SLURM_TASKS_PER_NODE to the step's layout
    // (may be uneven: "4(x2),3"). SLURM_NTASKS_PER_NODE only echoes an
    // --ntasks-per-node option, often sbatch's, which a step with another
    // layout inherits unchanged (`srun -n3` in a 2 x 2 job keeps "2"): it is
    // the last resort.
    let listed = ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"]
        .iter()
        .find_map(|v| {
            vars.get(*v)
                .filter(|l| !l.trim().is_empty())
                .map(|l| (*v, l))
        });
    let per_node: Vec<usize> = match listed {
        Some((var, raw)) => parse_tasks_per_node(raw).map_err(|reason| DistError::BadEnv {
            var: var.into(),
            value: raw.clone(),
            reason,
        })?,
        None => {
            let n = parse_optional::<usize>(vars, "SLURM_NTASKS_PER_NODE")?.ok_or_else(|| {
                DistError::MissingEnv {
                    var: "SLURM_TASKS_PER_NODE".into(),
                    context: WHY.into(),
                }
            })?;
            if n == 0 {
                return Err(DistError::BadEnv {
                    var: "SLURM_NTASKS_PER_NODE".into(),
                    value: "0".into(),
                    reason: "must be at least 1".into(),
                });
            }
            vec![n; world_size.div_ceil(n)]
        }
    };
    // SLURM_NODEID is exact; otherwise place the rank with SLURM's default
    // block distribution (consecutive ranks fill a node).
    let node_rank = match parse_optional::<usize>(vars, "SLURM_NODEID")? {
        Some(n) => n,
        None => node_of_rank(&per_node, rank).ok_or_else(|| DistError::BadEnv {
            var: "SLURM_PROCID".into(),
            value: rank.to_string(),
            reason: format!(
                "beyond the {} tasks of SLURM_TASKS_PER_NODE",
                per_node.iter().sum::<usize>()
            ),
        })?,
    };
    let local_world_size = *per_node.get(node_rank).ok_or_else(|| DistError::BadEnv {
        var: "SLURM_NODEID".into(),
        value: node_rank.to_string(),
        reason: format!("the tasks-per-node list has only {} nodes", per_node.len()),
    })?;

    let master_addr = match vars.get("MASTER_ADDR") {
        Some(a) => a.clone(),
        None => {
            // The step's nodes: a step on part of the allocation (`srun -N1
            // -w node2`) has its rank 0 on the first of them, not of the job's.
            let (var, list) = [
                "SLURM_STEP_NODELIST",
                "SLURM_JOB_NODELIST",
                "SLURM_NODELIST",
            ]
            .iter()
            .find_map(|v| vars.get(*v).map(|l| (*v, l)))
            .ok_or_else(|| DistError::MissingEnv {
                var: "SLURM_JOB_NODELIST".into(),
                context: "under SLURM when MASTER_ADDR is not set (the first node hosts the store)"
                    .into(),
            })?;
            first_host(list).map_err(|reason| DistError::BadEnv {
                var: var.into(),
                value: list.clone(),
                reason,
            })?
        }
    };
    let master_port = match parse_optional::<u16>(vars, "MASTER_PORT")? {
        Some(p) => p,
        None => {
            // Every task of the job derives the same port, and different
            // jobs sharing a node rarely collide.
            let id = parse_required::<u64>(
                vars,
                "SLURM_JOB_ID",
                "under SLURM when MASTER_PORT is not set (the port is derived from it)",
            )?;
            (20000 + id % 20000) as u16
        }
    };
    Ok(DistEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        node_rank,
        master_addr,
        master_port,
    })
}

fn node_of_rank(per_node: &[usize], rank: usize) -> Option<usize> {
    let mut end = 0;
    for (node, n) in per_node.iter().enumerate() {
        end += n;
        if rank < end {
            return Some(node);
        }
    }
    None
}

fn required<'a>(
    vars: &'a HashMap<String, String>,
    var: &str,
    context: &str,
) -> Result<&'a str, DistError> {
    match vars.get(var) {
        Some(v) if !v.trim().is_empty() => Ok(v.trim()),
        _ => Err(DistError::MissingEnv {
            var: var.into(),
            context: context.into(),
        }),
    }
}

fn parse_required<T: std::str::FromStr>(
    vars: &HashMap<String, String>,
    var: &str,
    context: &str,
) -> Result<T, DistError>
where
    T::Err: std::fmt::Display,
{
    let raw = required(vars, var, context)?;
    parse_value(var, raw)
}

fn parse_optional<T: std::str::FromStr>(
    vars: &HashMap<String, String>,
    var: &str,
) -> Result<Option<T>, DistError>
where
    T::Err: std::fmt::Display,
{
    match vars.get(var) {
        Some(raw) if !raw.trim().is_empty() => parse_value(var, raw.trim()).map(Some),
        _ => Ok(None),
    }
}

fn parse_value<T: std::str::FromStr>(var: &str, raw: &str) -> Result<T, DistError>
where
    T::Err: std::fmt::Display,
{
    raw.parse::<T>().map_err(|e| DistError::BadEnv {
        var: var.into(),
        value: raw.into(),
        reason: e.to_string(),
    })
}

/// Expands SLURM's tasks-per-node syntax: `"4(x2),3"` -> `[4, 4, 3]`.
pub fn parse_tasks_per_node(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        let (count, repeat) = match item.split_once('(') {
            Some((count, rest)) => {
                let times = rest
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("{item:?} is not of the form N(xM)"))?;
                let times: usize = times
                    .parse()
                    .map_err(|_| format!("bad repeat count in {item:?}"))?;
                (count, times)
            }
            None => (item, 1),
        };
        let count: usize = count
            .parse()
            .map_err(|_| format!("bad task count in {item:?}"))?;
        out.extend(std::iter::repeat_n(count, repeat));
    }
    if out.is_empty() || out.contains(&0) {
        return Err("expected at least one node with at least one task".into());
    }
    Ok(out)
}

/// The first host of a SLURM host list (where rank 0 runs under block distribution).
pub fn first_host(list: &str) -> Result<String, String> {
    expand_nodelist(list)?
        .into_iter()
        .next()
        .ok_or_else(|| "the node list is empty".into())
}

/// Expands a SLURM host list as `scontrol show hostnames` does:
/// `"node[01-03,07],gpu5"` -> `node01 node02 node03 node07 gpu5`. Zero padding
/// follows the range bounds; several bracket groups in one name
/// (`r[1-2]n[1-2]`) expand to their product, the leftmost varying slowest.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        let mut names = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            match rest.find('[') {
                None => {
                    names.iter_mut().for_each(|n| n.push_str(rest));
                    rest = "";
                }
                Some(open) => {
                    let close = rest[open..]
                        .find(']')
                        .map(|c| open + c)
                        .ok_or_else(|| format!("unclosed '[' in {item:?}"))?;
                    let prefix = &rest[..open];
                    let ids = expand_ranges(&rest[open + 1..close])
                        .map_err(|e| format!("{e} in {item:?}"))?;
                    names = names
                        .iter()
                        .flat_map(|n| ids.iter().map(move |id| format!("{n}{prefix}{id}")))
                        .collect();
                    rest = &rest[close + 1..];
                }
            }
        }
        hosts.extend(names);
    }
    Ok(hosts)
}

/// Splits on commas that are not inside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unmatched ']' at byte {i}"));
                }
            }
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unclosed '['".into());
    }
    items.push(&list[start..]);
    Ok(items
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect())
}

/// `"01-03,7"` -> `["01", "02", "03", "7"]`, keeping the width of the lower bound.
fn expand_ranges(spec: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let width = lo.len();
        let a: u64 = lo.parse().map_err(|_| format!("bad range {part:?}"))?;
        let b: u64 = hi.parse().map_err(|_| format!("bad range {part:?}"))?;
        if b < a {
            return Err(format!("descending range {part:?}"));
        }
        out.extend((a..=b).map(|i| format!("{i:0width$}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_set_is_a_single_process() {
        let (env, src) = DistEnv::from_vars_with_source(&HashMap::new()).unwrap();
        assert_eq!(env, DistEnv::single());
        assert_eq!(src, EnvSource::Single);
    }

    #[test]
    fn torchrun_variables() {
        let env = DistEnv::from_vars(&vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node01"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(
            env,
            DistEnv {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                local_world_size: 4,
                node_rank: 1,
                master_addr: "node01".into(),
                master_port: 29500
            }
        );
        assert_eq!(env.master(), "node01:29500");
    }

    #[test]
    fn torchrun_group_rank_wins_and_ipv6_master_gets_brackets() {
        let env = DistEnv::from_vars(&vars(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "1"),
            ("GROUP_RANK", "7"),
            ("MASTER_ADDR", "::1"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!(env.node_rank, 7);
        assert_eq!(env.master(), "[::1]:1234");
    }

    #[test]
    fn torchrun_errors_name_the_variable() {
        let err = DistEnv::from_vars(&vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "x"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("MASTER_PORT"), "{err}");

        let err = DistEnv::from_vars(&vars(&[
            ("RANK", "two"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "2"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("RANK") && err.contains("two"), "{err}");

        let err = DistEnv::from_vars(&vars(&[
            ("RANK", "4"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "x"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("RANK") && err.contains("world size 4"),
            "{err}"
        );
    }

    #[test]
    fn torchrun_world_of_one_needs_no_master() {
        let env = DistEnv::from_vars(&vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "1"),
        ]))
        .unwrap();
        assert_eq!(env.world_size, 1);
    }

    #[test]
    fn slurm_with_ntasks_per_node_and_ranged_nodelist() {
        let env = DistEnv::from_vars(&vars(&[
            ("SLURM_PROCID", "6"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "2"),
            ("SLURM_NTASKS_PER_NODE", "4"),
            ("SLURM_JOB_NODELIST", "node[01-04,07]"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap();
        assert_eq!(
            env,
            DistEnv {
                rank: 6,
                world_size: 8,
                local_rank: 2,
                local_world_size: 4,
                node_rank: 1,
                master_addr: "node01".into(),
                master_port: 20000 + (123456 % 20000) as u16,
            }
        );
    }

    #[test]
    fn slurm_uneven_tasks_per_node() {
        let base = [
            ("SLURM_NTASKS", "11"),
            ("SLURM_TASKS_PER_NODE", "4(x2),3"),
            ("SLURM_JOB_NODELIST", "a[1-2],b3"),
            ("SLURM_JOB_ID", "7"),
        ];
        let at = |rank: &str, local: &str| {
            let mut v = vars(&base);
            v.insert("SLURM_PROCID".into(), rank.into());
            v.insert("SLURM_LOCALID".into(), local.into());
            DistEnv::from_vars(&v).unwrap()
        };
        let last = at("10", "2");
        assert_eq!((last.node_rank, last.local_world_size), (2, 3));
        assert_eq!(last.master_addr, "a1");
        assert_eq!(last.master_port, 20007);
        let mid = at("5", "1");
        assert_eq!((mid.node_rank, mid.local_world_size), (1, 4));
    }

    #[test]
    fn slurm_step_layout_wins_over_the_jobs() {
        // `srun -n3` in an `sbatch -N2 --ntasks-per-node=2` job: srun keeps
        // the batch script's SLURM_NTASKS_PER_NODE=2 but sets the step's
        // layout in SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE.
        let env = DistEnv::from_vars(&vars(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "3"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "1"),
            ("SLURM_NTASKS_PER_NODE", "2"),
            ("SLURM_TASKS_PER_NODE", "2,1"),
            ("SLURM_STEP_TASKS_PER_NODE", "2,1"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURM_STEP_NODELIST", "n[1-2]"),
            ("SLURM_JOB_ID", "9"),
        ]))
        .unwrap();
        assert_eq!((env.node_rank, env.local_world_size), (1, 1));
        // `srun -N1 -w n2` in that job: rank 0 runs on n2, the step's first node.
        let env = DistEnv::from_vars(&vars(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "0"),
            ("SLURM_NTASKS_PER_NODE", "2"),
            ("SLURM_TASKS_PER_NODE", "2"),
            ("SLURM_STEP_TASKS_PER_NODE", "2"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
            ("SLURM_NODELIST", "n[1-2]"),
            ("SLURM_STEP_NODELIST", "n2"),
            ("SLURM_JOB_ID", "9"),
        ]))
        .unwrap();
        assert_eq!(env.master_addr, "n2");
        assert_eq!(env.local_world_size, 2);
    }

    #[test]
    fn slurm_master_variables_override_derived_ones() {
        let env = DistEnv::from_vars(&vars(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_TASKS_PER_NODE", "2"),
            ("SLURM_NODEID", "0"),
            ("MASTER_ADDR", "10.1.2.3"),
            ("MASTER_PORT", "29400"),
        ]))
        .unwrap();
        assert_eq!(
            (env.master_addr.as_str(), env.master_port),
            ("10.1.2.3", 29400)
        );
    }

    #[test]
    fn slurm_missing_job_id_is_named() {
        let err = DistEnv::from_vars(&vars(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_TASKS_PER_NODE", "2"),
            ("SLURM_JOB_NODELIST", "n1"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("SLURM_JOB_ID"), "{err}");
    }

    #[test]
    fn torchrun_wins_over_slurm() {
        let env = DistEnv::from_vars(&vars(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "5"),
        ]))
        .unwrap();
        assert_eq!((env.rank, env.world_size), (1, 2));
    }

    #[test]
    fn tasks_per_node_formats() {
        assert_eq!(parse_tasks_per_node("4(x2),3").unwrap(), vec![4, 4, 3]);
        assert_eq!(parse_tasks_per_node("8").unwrap(), vec![8]);
        assert_eq!(parse_tasks_per_node("2(x3)").unwrap(), vec![2, 2, 2]);
        assert_eq!(parse_tasks_per_node("1,2(x2),1").unwrap(), vec![1, 2, 2, 1]);
        assert!(parse_tasks_per_node("4(2)").is_err());
        assert!(parse_tasks_per_node("").is_err());
        assert!(parse_tasks_per_node("x").is_err());
    }

    #[test]
    fn nodelist_formats() {
        let e = |s: &str| expand_nodelist(s).unwrap();
        assert_eq!(e("node01"), ["node01"]);
        assert_eq!(
            e("node[01-04,07]"),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(e("a[1-2],b3"), ["a1", "a2", "b3"]);
        assert_eq!(e("gpu[8-11]"), ["gpu8", "gpu9", "gpu10", "gpu11"]);
        assert_eq!(e("x[098-101]"), ["x098", "x099", "x100", "x101"]);
        assert_eq!(e("r[1-2]n[3,5]"), ["r1n3", "r1n5", "r2n3", "r2n5"]);
        assert_eq!(e("pre[1]-post"), ["pre1-post"]);
        assert_eq!(e("h1,h2[3-4],h5"), ["h1", "h23", "h24", "h5"]);
        assert_eq!(first_host("node[01-04,07]").unwrap(), "node01");
        assert_eq!(first_host("a[1-2],b3").unwrap(), "a1");
        assert!(expand_nodelist("node[01-").is_err());
        assert!(expand_nodelist("node[5-3]").is_err());
        assert!(expand_nodelist("node]").is_err());
        assert!(first_host("").is_err());
    }
}
