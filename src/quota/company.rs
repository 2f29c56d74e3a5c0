//! A company's identity. Whatever the type of the company column, a company is its text form, the
//! value of `column::text`: that is what `companies.company_id` holds and what the counters are keyed
//! by. Rows whose company is NULL belong to no company and are neither counted nor limited.

use pgrx::pg_sys;

/// How the company column's values become text, decided once per column type.
pub(crate) enum TextForm {
    /// Integers, formatted here exactly as their output functions format them, without a palloc per
    /// row (the per-row path of bulk loads runs this for every row).
    Int2,
    Int4,
    Int8,
    /// Types stored as text (text, varchar, and types binary-coercible to text): their bytes.
    Bytes,
    /// Everything else: the cast to text, a cast function or the type's output function.
    Function {
        finfo: Box<pg_sys::FmgrInfo>,
        returns_cstring: bool,
    },
}

impl TextForm {
    /// Looks up the cast to text of `company_type`; the lookup data lives in `memory`.
    pub(crate) fn for_type(company_type: pg_sys::Oid, memory: pg_sys::MemoryContext) -> TextForm {
        match company_type {
            pg_sys::INT2OID => return TextForm::Int2,
            pg_sys::INT4OID => return TextForm::Int4,
            pg_sys::INT8OID => return TextForm::Int8,
            _ => {}
        }
        let mut function = pg_sys::InvalidOid;
        // SAFETY: catalog lookups on an existing type; fmgr_info_cxt fills the FmgrInfo we own, with
        // its auxiliary data in `memory`, which outlives it (both belong to one configuration).
        unsafe {
            let path = pg_sys::find_coercion_pathway(
                pg_sys::TEXTOID,
                company_type,
                pg_sys::CoercionContext::COERCION_EXPLICIT,
                &mut function,
            );
            let returns_cstring = match path {
                pg_sys::CoercionPathType::COERCION_PATH_RELABELTYPE => return TextForm::Bytes,
                pg_sys::CoercionPathType::COERCION_PATH_FUNC => false,
                _ => {
                    let mut is_varlena = false;
                    pg_sys::getTypeOutputInfo(company_type, &mut function, &mut is_varlena);
                    true
                }
            };
            let mut finfo = Box::new(std::mem::zeroed::<pg_sys::FmgrInfo>());
            pg_sys::fmgr_info_cxt(function, finfo.as_mut(), memory);
            TextForm::Function { finfo, returns_cstring }
        }
    }

    /// Replaces the contents of `out` with the text form of `datum` (a non-NULL value of the column).
    ///
    /// # Safety
    /// `datum` must be a valid, non-NULL value of the type this form was made for.
    pub(crate) unsafe fn write(&self, datum: pg_sys::Datum, out: &mut Vec<u8>) {
        out.clear();
        // SAFETY: per the contract, `datum` is a valid value of the column's type.
        unsafe {
            match self {
                TextForm::Int2 => write_integer(i64::from(datum.value() as i16), out),
                TextForm::Int4 => write_integer(i64::from(datum.value() as i32), out),
                TextForm::Int8 => write_integer(datum.value() as i64, out),
                TextForm::Bytes => out.extend_from_slice(text_bytes(datum)),
                TextForm::Function { finfo, returns_cstring } => {
                    let finfo = std::ptr::from_ref::<pg_sys::FmgrInfo>(finfo).cast_mut();
                    if *returns_cstring {
                        let cstring = pg_sys::OutputFunctionCall(finfo, datum);
                        out.extend_from_slice(std::ffi::CStr::from_ptr(cstring).to_bytes());
                    } else {
                        let text = pg_sys::FunctionCall1Coll(finfo, pg_sys::DEFAULT_COLLATION_OID, datum);
                        out.extend_from_slice(text_bytes(text));
                    }
                }
            }
        }
    }
}

/// The bytes of a text-like varlena, detoasted if needed (in the current memory context).
unsafe fn text_bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: the caller passes a valid text-like varlena.
    unsafe {
        let value = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        pgrx::varlena::varlena_to_byte_slice(value)
    }
}

fn write_integer(value: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// Company texts up to this many bytes are kept whole in the counters' keys; longer ones by their
/// SHA-256 digest (a collision would need a second-preimage attack on SHA-256).
pub(crate) const KEY_BYTES: usize = 64;

/// The key of one counter: a (database, quota, company).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct CounterKey {
    database: pg_sys::Oid,
    /// Length of the company text, or `HASHED` when `company` holds its digest.
    length: u16,
    /// Always zero: keeps the struct free of padding, since the shared hash table compares and
    /// hashes keys as raw bytes.
    reserved: u16,
    quota_id: i64,
    company: [u8; KEY_BYTES],
}

const HASHED: u16 = u16::MAX;

impl CounterKey {
    pub(crate) fn new(database: pg_sys::Oid, quota_id: i64, company: &[u8]) -> CounterKey {
        let mut key = CounterKey { database, length: 0, reserved: 0, quota_id, company: [0; KEY_BYTES] };
        if company.len() <= KEY_BYTES {
            key.length = company.len() as u16;
            key.company[..company.len()].copy_from_slice(company);
        } else {
            use sha2::Digest;
            key.length = HASHED;
            key.company[..32].copy_from_slice(&sha2::Sha256::digest(company)[..]);
        }
        key
    }

    pub(crate) fn quota_id(&self) -> i64 {
        self.quota_id
    }

    pub(crate) fn database(&self) -> pg_sys::Oid {
        self.database
    }

    /// The company's text, unless only its digest was kept.
    pub(crate) fn company(&self) -> Option<&[u8]> {
        (self.length != HASHED).then(|| &self.company[..self.length as usize])
    }

    /// The company for messages: its text, or its digest when the text was too long to keep.
    pub(crate) fn company_label(&self) -> String {
        if self.length == HASHED {
            let digest: String = self.company[..32].iter().map(|byte| format!("{byte:02x}")).collect();
            format!("(company with SHA-256 {digest})")
        } else {
            String::from_utf8_lossy(&self.company[..self.length as usize]).into_owned()
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::PgMemoryContexts;
    use pgrx::prelude::*;

    use super::*;

    /// The text form must equal `column::text` for every row, or counters and recounts would
    /// disagree. Checked against PostgreSQL itself for integer, text-like, function-cast and
    /// output-function types, including values that format specially.
    #[pg_test]
    fn text_form_matches_the_sql_cast_to_text() {
        let memory = PgMemoryContexts::new("test");
        let cases = [
            "(-32768)::int2",
            "2147483647::int4",
            "(-9223372036854775808)::int8",
            "'ACME Ltd'::text",
            "'x'::varchar(5)",
            "'ab  '::char(6)",
            "'1.50'::numeric",
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
            "true",
        ];
        for literal in cases {
            let (actual, expected) = Spi::connect(|client| {
                let row = client
                    .select(
                        &format!("SELECT pg_typeof({literal})::oid, ({literal})::text, {literal}"),
                        None,
                        &[],
                    )
                    .unwrap()
                    .first();
                let typid = row.get::<pg_sys::Oid>(1).unwrap().unwrap();
                let datum = row.get_datum_by_ordinal(3).unwrap().unwrap();
                let mut out = Vec::new();
                unsafe { TextForm::for_type(typid, memory.value()).write(datum, &mut out) };
                (String::from_utf8(out).unwrap(), row.get::<String>(2).unwrap().unwrap())
            });
            assert_eq!(actual, expected, "{literal}");
        }
    }

    #[pg_test]
    fn long_companies_are_keyed_by_digest_and_stay_distinct() {
        let long_a = [b'a'; 200];
        let mut long_b = long_a;
        long_b[199] = b'b';
        let db = pg_sys::Oid::from(1);
        assert_ne!(CounterKey::new(db, 1, &long_a), CounterKey::new(db, 1, &long_b));
        assert_eq!(CounterKey::new(db, 1, &long_a), CounterKey::new(db, 1, &long_a));
        assert_ne!(CounterKey::new(db, 1, b"acme"), CounterKey::new(db, 2, b"acme"));
        assert_eq!(std::mem::size_of::<CounterKey>(), 4 + 2 + 2 + 8 + KEY_BYTES);
    }
}
