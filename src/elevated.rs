//! The extension's own SQL, run safely on behalf of whichever role triggered it.
//!
//! tenant_scale's triggers and functions read and write internal tables that PUBLIC cannot touch, for
//! any caller. Such SQL runs inside [`as_extension_owner`]: as the owner of the extension (the way a
//! SECURITY DEFINER function would, flagged SECURITY_LOCAL_USERID_CHANGE so that the caller's code
//! cannot run with those rights meanwhile, and SECURITY_RESTRICTED_OPERATION so that nothing run
//! there can change the session), and with `search_path = pg_catalog, pg_temp` so that no function,
//! operator or table the caller created can be resolved in place of the intended one. All of it is
//! undone when the closure returns; when it raises an error, the (sub)transaction abort undoes it,
//! exactly as for SECURITY DEFINER functions.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Runs `body` as `owner` with a pinned search_path.
pub(crate) fn as_extension_owner<R>(owner: pg_sys::Oid, body: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    // SAFETY: the save/set/restore sequence PostgreSQL's own fmgr_security_definer uses; GUC nesting
    // is opened and closed around the body at the same level.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let result = body();
        pg_sys::AtEOXact_GUC(true, nest_level);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
        result
    }
}

/// Results of the extension's own SPI calls. SQL errors inside them are raised by PostgreSQL itself;
/// what reaches here is a pgrx-level surprise (a result of an unexpected shape), raised as an ERROR
/// naming what was being done.
pub(crate) trait OrRaise<T> {
    fn or_raise(self, doing: &str) -> T;
}

impl<T, E: std::fmt::Display> OrRaise<T> for Result<T, E> {
    fn or_raise(self, doing: &str) -> T {
        self.unwrap_or_else(|error| pgrx::error!("tenant_scale: {doing}: {error}"))
    }
}

/// The role that owns the extension (a superuser: the extension is not trusted). Raises an error when
/// the extension is not installed in this database.
pub(crate) fn extension_owner() -> pg_sys::Oid {
    Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'tenant_scale'",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| pgrx::error!("the tenant_scale extension is not installed in this database"))
}

/// `schema.name` of a relation, each part quoted only when it must be: safe to splice into SQL text.
pub(crate) fn qualified_relation_name(relid: pg_sys::Oid) -> Option<String> {
    // SAFETY: catalog lookups that return NULL for a missing relation; the strings are palloc'd copies.
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        if name.is_null() {
            return None;
        }
        let schema = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if schema.is_null() {
            return None;
        }
        Some(format!("{}.{}", quote_identifier_cstr(schema), quote_identifier_cstr(name)))
    }
}

/// An identifier quoted as quote_ident() would.
pub(crate) fn quote_identifier(identifier: &str) -> String {
    match std::ffi::CString::new(identifier) {
        // SAFETY: a valid NUL-terminated string; quote_identifier returns its input or a palloc'd copy.
        Ok(c_identifier) => unsafe { quote_identifier_cstr(c_identifier.as_ptr()) },
        // Identifiers cannot hold NUL bytes; quote what we can see rather than fail.
        Err(_) => format!("\"{}\"", identifier.replace('\0', "").replace('"', "\"\"")),
    }
}

unsafe fn quote_identifier_cstr(identifier: *const std::ffi::c_char) -> String {
    // SAFETY: the caller passes a valid NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(pg_sys::quote_identifier(identifier)).to_string_lossy().into_owned() }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn body_sees_pinned_search_path_and_owner_then_both_are_restored() {
        Spi::run("CREATE ROLE tenant_scale_elevated_probe").unwrap();
        Spi::run("SET search_path = public").unwrap();
        Spi::run("SET ROLE tenant_scale_elevated_probe").unwrap();
        let superuser = Spi::get_one::<pg_sys::Oid>("SELECT oid FROM pg_roles WHERE rolname = 'postgres'")
            .unwrap()
            .unwrap();
        let inside = super::as_extension_owner(superuser, || {
            Spi::get_two::<String, String>("SELECT current_setting('search_path'), current_user::text")
                .unwrap()
        });
        assert_eq!(inside, (Some("pg_catalog, pg_temp".into()), Some("postgres".into())));
        let after =
            Spi::get_two::<String, String>("SELECT current_setting('search_path'), current_user::text")
                .unwrap();
        assert_eq!(after, (Some("public".into()), Some("tenant_scale_elevated_probe".into())));
    }

    #[pg_test]
    fn identifiers_are_quoted_only_when_needed() {
        assert_eq!(super::quote_identifier("patients"), "patients");
        assert_eq!(super::quote_identifier("Patients"), "\"Patients\"");
        assert_eq!(super::quote_identifier("a\"b; drop"), "\"a\"\"b; drop\"");
    }
}
