//! The sandbox: a pure plan of the root ([`plan`]), its making and reuse on the host
//! ([`root`]), the child's set-up inside fresh namespaces ([`child`]) and the seccomp
//! filter ([`seccomp`]).

pub mod child;
pub mod plan;
pub mod root;
pub mod seccomp;

pub use plan::{parse_sandbox_paths, plan_sandbox, SandboxInput, SandboxPlan};
pub use root::{RootPool, SandboxRoot};
