//! tenant_scale: one PostgreSQL database serving thousands of tenants ("companies") on subscription plans.
//!
//! Each capability lives in its own module; this file only wires the extension together: the module
//! magic, and in `_PG_init` the GUCs, shared memory, hooks and background workers, in that order.
//! Hand-written SQL (tables, views, grants) lives in `sql/` and is included in order by the modules.

use pgrx::prelude::*;

mod backend_local;
mod elevated;
mod health;
mod hook_chain;
mod pagination;
mod quota;
mod replica;
mod shmem;
mod statements;
mod stats;
mod unguarded;

pgrx::pg_module_magic!(name, version);

/// Prefix of every GUC the extension defines. Reserving it turns a typo such as `SET tenant_scale.compnay`
/// into an error instead of a silently ignored placeholder.
const GUC_PREFIX: &std::ffi::CStr = c"tenant_scale";

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    shmem::note_library_load();
    pagination::register_gucs();
    replica::register_gucs();
    quota::register_gucs();
    stats::register_gucs();
    reserve_guc_prefix();
    quota::register_shared_memory();
    stats::register_shared_memory();
    statements::install();
    quota::register_callbacks();
    stats::install_hooks();
    stats::register_worker();
}

fn reserve_guc_prefix() {
    // SAFETY: called from _PG_init with a static NUL-terminated string, as PostgreSQL's own contrib
    // modules do after defining their GUCs.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        pg_sys::EmitWarningsOnPlaceholders(GUC_PREFIX.as_ptr());
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        pg_sys::MarkGUCPrefixReserved(GUC_PREFIX.as_ptr());
    }
}

/// Version of the loaded shared library. It can differ from `pg_extension.extversion` while an
/// `ALTER EXTENSION tenant_scale UPDATE` is pending, which is exactly when a DBA wants to see both.
#[pg_extern(stable, parallel_safe)]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn version_reports_the_crate_version() {
        let reported = Spi::get_one::<String>("SELECT tenant_scale.version()");
        assert_eq!(reported, Ok(Some(env!("CARGO_PKG_VERSION").to_string())));
    }

    #[pg_test(error = "invalid configuration parameter name \"tenant_scale.no_such_setting\"")]
    fn unknown_setting_under_the_reserved_prefix_is_an_error() {
        Spi::run("SET tenant_scale.no_such_setting = 'x'").unwrap();
    }
}

/// Required by `cargo pgrx test`: settings for the throwaway cluster the `#[pg_test]`s run in.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'tenant_scale'"]
    }
}
