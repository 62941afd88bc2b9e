//! Choosing the accelerator. `auto` picks KVM only when KVM can actually run
//! the guest kernel: some hosts expose a /dev/kvm (PVM, the `kvm_pvm` module)
//! on which a stock kernel dies, and there only TCG works.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// The decision and why it was made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// Facts about the host's KVM, read without starting a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct KvmFacts {
    pub dev_kvm_usable: bool,
    pub pvm: bool,
}

impl KvmFacts {
    pub fn read() -> Self {
        let dev_kvm_usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        KvmFacts { dev_kvm_usable, pvm }
    }
}

/// Decides without booting when the facts settle it; `None` means a boot
/// probe is needed (KVM present and not known to be PVM).
pub fn decide_from_facts(choice: AccelChoice, facts: &KvmFacts) -> Result<Option<AccelDecision>, String> {
    match choice {
        AccelChoice::Tcg => Ok(Some(AccelDecision { accel: Accel::Tcg, reason: "requested with --accel tcg".into() })),
        AccelChoice::Kvm => {
            if !facts.dev_kvm_usable {
                return Err("--accel kvm: /dev/kvm is missing or cannot be opened".into());
            }
            Ok(Some(AccelDecision { accel: Accel::Kvm, reason: "requested with --accel kvm".into() }))
        }
        AccelChoice::Auto => {
            if !facts.dev_kvm_usable {
                Ok(Some(AccelDecision {
                    accel: Accel::Tcg,
                    reason: "no usable /dev/kvm: guests run under TCG emulation".into(),
                }))
            } else if facts.pvm {
                Ok(Some(AccelDecision {
                    accel: Accel::Tcg,
                    reason: "/dev/kvm is PVM (kvm_pvm module), which cannot run a stock guest kernel: guests run under TCG emulation".into(),
                }))
            } else {
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_host_falls_back_to_tcg() {
        let facts = KvmFacts { dev_kvm_usable: true, pvm: true };
        let d = decide_from_facts(AccelChoice::Auto, &facts).unwrap().unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("PVM"));
    }

    #[test]
    fn plain_kvm_needs_a_probe() {
        let facts = KvmFacts { dev_kvm_usable: true, pvm: false };
        assert_eq!(decide_from_facts(AccelChoice::Auto, &facts).unwrap(), None);
    }

    #[test]
    fn forced_kvm_without_device_is_an_error() {
        let facts = KvmFacts { dev_kvm_usable: false, pvm: false };
        assert!(decide_from_facts(AccelChoice::Kvm, &facts).is_err());
    }
}
