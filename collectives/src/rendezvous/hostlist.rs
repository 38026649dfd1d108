//! SLURM host lists and task counts: `node[01-04,07],gpu-a[1-2]` and `2(x3),1`.
//!
//! 1. A host list is a comma-separated list of host expressions (commas inside brackets belong
//!    to the bracket). An expression is literal text and bracket groups, `[a-b,c]`, each item a
//!    number or a range of numbers; several groups multiply out (`rack[1-2]-n[01-02]` is four
//!    hosts, the last group varying fastest, as `scontrol show hostnames` prints them).
//! 2. Zero padding is kept: a range's width is the width of its first bound (`[08-10]` gives
//!    08, 09, 10).
//! 3. SLURM_TASKS_PER_NODE is `count` or `count(xrepeat)` items, one per host in list order.
//!
//! Invariant HOSTLIST-1: malformed input (unbalanced or nested brackets, empty items, a range
//! going down, non-digits in a range, more than [`MAX_HOSTS`] hosts) is a `Config` error naming
//! the variable and the bad part; the parser never panics and never guesses.

use parallel_engine::{Error, ErrorKind, Result};

/// The most hosts a list may expand to (bounds memory on untrusted input).
pub const MAX_HOSTS: usize = 1 << 20;

fn bad(var: &str, list: &str, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Config,
        "tree",
        format!("{var}={list:?} is not a valid SLURM list: {why}"),
    )
}

/// Splits at commas outside brackets; checks that brackets are balanced and not nested.
fn split_top(var: &str, list: &str) -> Result<Vec<String>> {
    let (mut parts, mut cur, mut depth) = (Vec::new(), String::new(), 0u8);
    for c in list.chars() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(bad(var, list, "nested '['")),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(bad(var, list, "']' without '['")),
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if depth != 0 {
        return Err(bad(var, list, "'[' without ']'"));
    }
    parts.push(cur);
    let parts: Vec<String> = parts.into_iter().map(|p| p.trim().to_string()).collect();
    if parts.iter().any(String::is_empty) {
        return Err(bad(var, list, "an empty host"));
    }
    Ok(parts)
}

/// The numbers of one bracket group (`01-04,07`), as zero-padded text (HOSTLIST-2).
fn expand_group(var: &str, list: &str, group: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in group.split(',') {
        let item = item.trim();
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(bad(var, list, format!("[{group}] has the item {item:?}")));
        }
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| bad(var, list, "a number too large"))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(bad(var, list, format!("the range {item:?} goes down")));
        }
        if (b - a) as usize >= MAX_HOSTS || out.len() + (b - a) as usize >= MAX_HOSTS {
            return Err(bad(var, list, format!("more than {MAX_HOSTS} hosts")));
        }
        let width = lo.len();
        out.extend((a..=b).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

/// The hosts of one expression such as `rack[1-2]-n[01-02]` (HOSTLIST-1).
fn expand_one(var: &str, list: &str, expr: &str) -> Result<Vec<String>> {
    let mut hosts = vec![String::new()];
    let mut rest = expr;
    while !rest.is_empty() {
        let (text, tail) = rest.split_once('[').unwrap_or((rest, ""));
        hosts.iter_mut().for_each(|h| h.push_str(text));
        if text.len() == rest.len() {
            break;
        }
        let (group, after) = tail
            .split_once(']')
            .ok_or_else(|| bad(var, list, "'[' without ']'"))?;
        let nums = expand_group(var, list, group)?;
        if hosts.len().saturating_mul(nums.len()) > MAX_HOSTS {
            return Err(bad(var, list, format!("more than {MAX_HOSTS} hosts")));
        }
        hosts = hosts
            .iter()
            .flat_map(|h| nums.iter().map(move |n| format!("{h}{n}")))
            .collect();
        rest = after;
    }
    Ok(hosts)
}

/// Every host of a SLURM host list, in order. `var` names the variable in errors.
pub fn expand_hostlist(var: &str, list: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for expr in split_top(var, list)? {
        let hosts = expand_one(var, list, &expr)?;
        if out.len() + hosts.len() > MAX_HOSTS {
            return Err(bad(var, list, format!("more than {MAX_HOSTS} hosts")));
        }
        out.extend(hosts);
    }
    Ok(out)
}

/// Tasks per host from SLURM_TASKS_PER_NODE (`2(x3),1` is [2, 2, 2, 1]).
pub fn expand_tasks_per_node(var: &str, spec: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for item in spec.split(',') {
        let item = item.trim();
        let (count, repeat) = match item.split_once("(x") {
            None => (item, "1"),
            Some((c, r)) => (
                c,
                r.strip_suffix(')')
                    .ok_or_else(|| bad(var, spec, format!("{item:?} lacks ')'")))?,
            ),
        };
        let num = |s: &str| {
            s.parse::<usize>()
                .ok()
                .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad(var, spec, format!("{item:?} is not N or N(xM)")))
        };
        let (count, repeat) = (num(count)?, num(repeat)?);
        if repeat == 0 || out.len() + repeat > MAX_HOSTS {
            return Err(bad(
                var,
                spec,
                format!("{item:?} repeats 0 or too many times"),
            ));
        }
        out.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(out)
}

/// The host of `rank` when ranks fill hosts in blocks, in list order (SLURM's default
/// distribution), found without listing every rank (the counts are untrusted: `10000000000`
/// must not allocate). None when the two lists disagree on the number of hosts, or past the
/// last rank.
pub fn host_of_rank<'a>(hosts: &'a [String], tasks: &[usize], rank: usize) -> Option<&'a str> {
    if hosts.len() != tasks.len() {
        return None;
    }
    let mut first = 0usize;
    for (h, &n) in hosts.iter().zip(tasks) {
        first = first.checked_add(n)?;
        if rank < first {
            return Some(h);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &str) -> Vec<String> {
        expand_hostlist("SLURM_JOB_NODELIST", list).unwrap()
    }

    #[test]
    fn hostlist_1_expands_ranges_singles_and_plain_hosts_in_order() {
        assert_eq!(
            hosts("node[01-04,07],gpu-a[1-2]"),
            [
                "node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2"
            ]
        );
        assert_eq!(hosts("gpu5, gpu6"), ["gpu5", "gpu6"]);
        assert_eq!(hosts("a[3]"), ["a3"]);
        assert_eq!(hosts("login"), ["login"]);
    }

    #[test]
    fn hostlist_1_multiplies_several_bracket_groups_last_fastest() {
        assert_eq!(
            hosts("rack[1-2]-n[01-02]"),
            ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]
        );
        assert_eq!(hosts("r[1,3]x"), ["r1x", "r3x"]);
    }

    #[test]
    fn hostlist_2_keeps_zero_padding_across_widths() {
        assert_eq!(hosts("n[08-10]"), ["n08", "n09", "n10"]);
        assert_eq!(hosts("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(hosts("n[098-100]"), ["n098", "n099", "n100"]);
    }

    #[test]
    fn hostlist_1_malformed_lists_are_config_errors_naming_the_part() {
        for (list, says) in [
            ("node[01-04", "'[' without ']'"),
            ("node01-04]", "']' without '['"),
            ("node[[1]]", "nested"),
            ("node[]", "has the item"),
            ("node[a-b]", "has the item \"a-b\""),
            ("node[4-1]", "goes down"),
            ("node[1-]", "has the item"),
            ("a,,b", "empty host"),
            ("", "empty host"),
            ("n[0-99999999999999999999]", "too large"),
            ("n[0-2000000]", "more than"),
            ("a[0-1999]b[0-999]", "more than"),
        ] {
            let e = expand_hostlist("SLURM_JOB_NODELIST", list).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{list}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("SLURM_JOB_NODELIST") && msg.contains(says),
                "{list}: {msg}"
            );
        }
    }

    #[test]
    fn hostlist_3_tasks_per_node_repeats_and_maps_ranks_to_hosts_in_blocks() {
        let t = expand_tasks_per_node("SLURM_TASKS_PER_NODE", "2(x3),1").unwrap();
        assert_eq!(t, [2, 2, 2, 1]);
        let h = hosts("n[1-4]");
        let by_rank: Vec<Option<&str>> = (0..8).map(|k| host_of_rank(&h, &t, k)).collect();
        assert_eq!(
            by_rank,
            [
                Some("n1"),
                Some("n1"),
                Some("n2"),
                Some("n2"),
                Some("n3"),
                Some("n3"),
                Some("n4"),
                None
            ]
        );
        assert!(host_of_rank(&h[..3], &t, 0).is_none());
        for bad in ["2(x", "2(x0)", "x", "2(3)", "", "-1", "2(x3),"] {
            let e = expand_tasks_per_node("SLURM_TASKS_PER_NODE", bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
            assert!(e.to_string().contains("SLURM_TASKS_PER_NODE"), "{e}");
        }
    }

    #[test]
    fn hostlist_1_huge_task_counts_map_ranks_without_listing_them() {
        let t = expand_tasks_per_node("SLURM_TASKS_PER_NODE", "10000000000000(x2),1").unwrap();
        let h = hosts("n[1-3]");
        assert_eq!(host_of_rank(&h, &t, 5), Some("n1"));
        assert_eq!(host_of_rank(&h, &t, 10_000_000_000_000), Some("n2"));
        assert_eq!(host_of_rank(&h, &t, 20_000_000_000_000), Some("n3"));
        let over = expand_tasks_per_node("T", &format!("{}(x2)", usize::MAX)).unwrap();
        assert_eq!(host_of_rank(&h[..2], &over, usize::MAX), None);
    }
}
