//! The wire rules that `/v1/infer` and the OpenAI routes share, in one place so that both
//! read a parameter alike: the range of `temperature`, and `stop` as one string or a list.
//!
//! Each route family keeps its own rules where the schemas differ (`max_tokens`' range,
//! OpenAI's limit of four stop sequences) and words its own errors.

use std::ops::RangeInclusive;

use serde::Deserialize;

/// The range the wire schemas allow for `temperature` (the upstream OpenAPI's and OpenAI's).
pub(super) const TEMPERATURE: RangeInclusive<f32> = 0.0..=2.0;

/// `stop` as OpenAI-style APIs take it: one string or a list. `null` and an absent field
/// are no stop strings.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub(super) enum StopStrings {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl StopStrings {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            StopStrings::None => Vec::new(),
            StopStrings::One(stop) => vec![stop],
            StopStrings::Many(stops) => stops,
        }
    }
}
