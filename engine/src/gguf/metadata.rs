//! GGUF metadata: the key/value section, with typed getters whose errors name the key.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::error::{GgufError, Result};

/// The type tag of a metadata value (`enum gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Encoded size of one value of a fixed-size type; for strings and arrays the smallest
    /// possible encoding (an empty one), used to bound counts before allocating.
    pub(crate) fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 4 + 8,
        }
    }
}

/// One metadata value. Arrays keep their element type so that an empty array is still typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer value as i128, so that callers can convert it checked into the width they
    /// want: files disagree on whether counts are u32, i32 or u64.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A float value (f32 or f64; f64 narrowed, as llama.cpp does for hyper-parameters).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// A short description for error messages (`u32 7`, `array of 49152 string`).
    pub fn describe(&self) -> String {
        match self {
            Value::Array(t, items) => format!("an array of {} {t:?}", items.len()),
            Value::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
            other => format!("{other}"),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(v) => write!(f, "u8 {v}"),
            Value::I8(v) => write!(f, "i8 {v}"),
            Value::U16(v) => write!(f, "u16 {v}"),
            Value::I16(v) => write!(f, "i16 {v}"),
            Value::U32(v) => write!(f, "u32 {v}"),
            Value::I32(v) => write!(f, "i32 {v}"),
            Value::F32(v) => write!(f, "f32 {v}"),
            Value::Bool(v) => write!(f, "bool {v}"),
            Value::String(v) => write!(f, "string {v:?}"),
            Value::Array(t, items) => write!(f, "array of {} {t:?}", items.len()),
            Value::U64(v) => write!(f, "u64 {v}"),
            Value::I64(v) => write!(f, "i64 {v}"),
            Value::F64(v) => write!(f, "f64 {v}"),
        }
    }
}

/// The metadata of one GGUF file, in file order, with lookups by key.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    path: PathBuf,
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

/// Conversion of a metadata value into a Rust type, used by [`Metadata::get`].
pub trait FromValue<'a>: Sized {
    /// What the error message says was expected.
    const EXPECTED: &'static str;
    fn from_value(v: &'a Value) -> Option<Self>;
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue<'_> for $t {
            const EXPECTED: &'static str = concat!("an integer that fits ", stringify!($t));
            fn from_value(v: &Value) -> Option<Self> {
                v.as_int().and_then(|i| <$t>::try_from(i).ok())
            }
        }
    )*};
}
int_from_value!(u8, i8, u16, i16, u32, i32, u64, i64, usize);

impl FromValue<'_> for f32 {
    const EXPECTED: &'static str = "a float";
    fn from_value(v: &Value) -> Option<Self> {
        v.as_f32()
    }
}

impl FromValue<'_> for f64 {
    const EXPECTED: &'static str = "a float";
    fn from_value(v: &Value) -> Option<Self> {
        match *v {
            Value::F32(x) => Some(x.into()),
            Value::F64(x) => Some(x),
            _ => None,
        }
    }
}

impl FromValue<'_> for bool {
    const EXPECTED: &'static str = "a bool";
    fn from_value(v: &Value) -> Option<Self> {
        v.as_bool()
    }
}

impl<'a> FromValue<'a> for &'a str {
    const EXPECTED: &'static str = "a string";
    fn from_value(v: &'a Value) -> Option<Self> {
        v.as_str()
    }
}

impl<'a> FromValue<'a> for &'a [Value] {
    const EXPECTED: &'static str = "an array";
    fn from_value(v: &'a Value) -> Option<Self> {
        v.as_array()
    }
}

impl Metadata {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            ..Self::default()
        }
    }

    /// Adds an entry; a repeated key is an error, as in llama.cpp.
    pub(crate) fn insert(&mut self, key: String, value: Value) -> Result<()> {
        if self.index.contains_key(&key) {
            return Err(GgufError::Malformed {
                path: self.path.clone(),
                msg: format!("duplicate metadata key `{key}`"),
            });
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        Ok(())
    }

    /// The file these entries came from (used in error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All entries in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// The raw value of a key.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// A typed value; errors name the key when it is missing or of another type.
    pub fn get<'a, T: FromValue<'a>>(&'a self, key: &str) -> Result<T> {
        match self.get_opt(key)? {
            Some(v) => Ok(v),
            None => Err(GgufError::MissingKey {
                path: self.path.clone(),
                key: key.to_string(),
            }),
        }
    }

    /// A typed value if the key is present; an error only if it has another type.
    pub fn get_opt<'a, T: FromValue<'a>>(&'a self, key: &str) -> Result<Option<T>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        T::from_value(v)
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, T::EXPECTED, v))
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get(key)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        self.get(key)
    }

    /// A string array (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.typed_array(key, "an array of strings", Value::as_str)
    }

    /// An integer array converted to i32 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.typed_array(key, "an array of i32", |v| {
            v.as_int().and_then(|i| i32::try_from(i).ok())
        })
    }

    /// A float array (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.typed_array(key, "an array of floats", Value::as_f32)
    }

    fn typed_array<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        f: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Vec<T>> {
        let Some(whole) = self.value(key) else {
            return Err(GgufError::MissingKey {
                path: self.path.clone(),
                key: key.to_string(),
            });
        };
        let items = whole
            .as_array()
            .ok_or_else(|| self.wrong_type(key, expected, whole))?;
        items
            .iter()
            .map(|v| f(v).ok_or_else(|| self.wrong_type(key, expected, whole)))
            .collect()
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &Value) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: found.describe(),
        }
    }
}
