//! What this machine can build, as Nix 2.8 decides it: its `system`, the
//! `extra-platforms` it also runs (`i686-linux` on x86_64, and the `x86_64-vN-linux`
//! microarchitecture levels its CPU supports), and its `system-features` (`benchmark`,
//! `big-parallel`, `nixos-test`, and `kvm` where `/dev/kvm` can be opened). A derivation
//! whose `system` is none of these, or that requires a feature not in
//! `system-features`, is refused before anything is built
//! ([`crate::error::BuildError::WrongPlatform`]).

use std::collections::BTreeSet;

use firn_derivation::Derivation;

/// This machine's system type (`x86_64-linux`, `aarch64-linux`, …).
pub fn this_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        a => a,
    };
    format!("{arch}-{}", std::env::consts::OS)
}

/// The x86_64 microarchitecture levels (`x86_64-v1` … `x86_64-v4`) whose CPU flags all
/// appear in `/proc/cpuinfo`'s `flags` line (Nix's `computeLevels`, with libcpuid's
/// names as the kernel prints them).
pub fn x86_64_levels(cpuinfo: &str) -> Vec<String> {
    let flags: BTreeSet<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags").and_then(|r| r.split_once(':')))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let levels: [&[&str]; 4] = [
        &["cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2"],
        &[
            "cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2",
        ],
        &["avx", "avx2", "f16c", "fma", "abm", "movbe"],
        &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
    ];
    let mut out = Vec::new();
    for (i, needed) in levels.iter().enumerate() {
        if !needed.iter().all(|f| flags.contains(f)) {
            break;
        }
        out.push(format!("x86_64-v{}", i + 1));
    }
    out
}

/// Nix's default `extra-platforms`.
pub fn default_extra_platforms() -> Vec<String> {
    let mut p = Vec::new();
    if this_system() == "x86_64-linux" {
        p.push("i686-linux".to_owned());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        p.extend(
            x86_64_levels(&cpuinfo)
                .into_iter()
                .map(|l| format!("{l}-linux")),
        );
    }
    p
}

/// Nix's default `system-features`.
pub fn default_system_features() -> Vec<String> {
    let mut f: Vec<String> = ["benchmark", "big-parallel", "nixos-test"]
        .map(str::to_owned)
        .to_vec();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm {
        f.push("kvm".to_owned());
    }
    f.sort();
    f
}

/// The features `drv` requires (`requiredSystemFeatures`, from the environment or the
/// structured attributes), sorted.
pub fn required_system_features(drv: &Derivation<'_>) -> BTreeSet<String> {
    if let Some(json) = drv.env.get(b"__json".as_slice()) {
        let parsed: Option<serde_json::Value> = serde_json::from_slice(json).ok();
        return parsed
            .as_ref()
            .and_then(|v| v.get("requiredSystemFeatures"))
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
    }
    drv.env
        .get(b"requiredSystemFeatures".as_slice())
        .map(|v| {
            String::from_utf8_lossy(v)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        let base = "flags\t\t: fpu cx8 cmov mmx fxsr sse sse2";
        assert_eq!(x86_64_levels(base), ["x86_64-v1"]);
        let v3 = format!("{base} cx16 lahf_lm popcnt pni ssse3 sse4_1 sse4_2 avx avx2 f16c fma abm movbe avx512f");
        assert_eq!(x86_64_levels(&v3), ["x86_64-v1", "x86_64-v2", "x86_64-v3"]);
        assert!(x86_64_levels("flags : sse").is_empty());
        assert!(x86_64_levels("").is_empty());
    }

    #[test]
    fn features_from_env_and_structured_attrs() {
        let mut d = Derivation::default();
        d.env.insert(
            std::borrow::Cow::Borrowed(b"requiredSystemFeatures".as_slice()),
            std::borrow::Cow::Borrowed(b"kvm  gpu".as_slice()),
        );
        assert_eq!(
            required_system_features(&d).into_iter().collect::<Vec<_>>(),
            ["gpu", "kvm"]
        );
        d.env.insert(
            std::borrow::Cow::Borrowed(b"__json".as_slice()),
            std::borrow::Cow::Borrowed(
                br#"{"requiredSystemFeatures":["big-parallel"]}"#.as_slice(),
            ),
        );
        assert_eq!(
            required_system_features(&d).into_iter().collect::<Vec<_>>(),
            ["big-parallel"]
        );
    }
}
