//! `keen:ua_parser`: user-agent string to device, browser and OS, from uap-core's rules.
//!
//! The rules (uap-core 0.18.0, Apache-2.0) are compiled into the binary. Compiling them takes a
//! moment, so it happens once, the first time an event asks for the add-on. Parsing a user agent
//! means running many regular expressions; real traffic repeats a small set of user agents, so
//! results are cached (a bounded map per shard, emptied when full) and a repeated user agent costs
//! a hash lookup.
//!
//! Output: `{"device": {"family", "type"}, "browser": {"family", "major", "minor", "patch"},
//! "os": {"family", "major", "minor", "patch", "patch_minor"}}` with version parts as strings or
//! `null`. uap-core has no device type; `type` is derived from the device and OS families
//! (`mobile phone`, `tablet`, `desktop`, `bot`, `other`).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, OnceLock, RwLock};

use serde_json::{Value, json};

static RULES: &str = include_str!("../data/uap-core-regexes.json");

const SHARDS: usize = 16;
const ENTRIES_PER_SHARD: usize = 4096;

/// The user-agent parser with its cache.
pub struct UaParser {
    extractor: OnceLock<Result<ua_parser::Extractor<'static>, String>>,
    cache: Vec<RwLock<HashMap<Box<str>, Arc<str>>>>,
    hasher: RandomState,
}

impl std::fmt::Debug for UaParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UaParser")
    }
}

impl Default for UaParser {
    fn default() -> Self {
        Self::new()
    }
}

fn build_extractor() -> Result<ua_parser::Extractor<'static>, String> {
    let regexes: ua_parser::Regexes<'static> =
        serde_json::from_str(RULES).map_err(|e| format!("bundled uap-core rules do not parse: {e}"))?;
    ua_parser::Extractor::try_from(regexes).map_err(|e| format!("bundled uap-core rules do not compile: {e}"))
}

impl UaParser {
    /// A parser; the rules are compiled on first use.
    pub fn new() -> Self {
        Self {
            extractor: OnceLock::new(),
            cache: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Compiles the rules now instead of on first use.
    pub fn warm_up(&self) -> Result<(), String> {
        self.extractor().map(|_| ())
    }

    fn extractor(&self) -> Result<&ua_parser::Extractor<'static>, String> {
        self.extractor
            .get_or_init(build_extractor)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The parsed form of `ua` as a value (the tests compare values).
    #[cfg(test)]
    pub fn parse(&self, ua: &str) -> Result<Value, String> {
        let json = self.parse_json(ua)?;
        serde_json::from_str(&json).map_err(|e| e.to_string())
    }

    /// The parsed form of `ua` as JSON text, shared with the cache: a repeated user agent costs a
    /// lookup and a reference count, and the event writes the text out as it is.
    pub fn parse_json(&self, ua: &str) -> Result<Arc<str>, String> {
        let shard = &self.cache[self.hasher.hash_one(ua) as usize % SHARDS];
        let hit = shard.read().unwrap_or_else(|p| p.into_inner()).get(ua).cloned();
        if let Some(hit) = hit {
            return Ok(hit);
        }
        let parsed: Arc<str> = Arc::from(self.parse_uncached(ua)?.to_string());
        let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= ENTRIES_PER_SHARD {
            shard.clear();
        }
        shard.insert(ua.into(), parsed.clone());
        Ok(parsed)
    }

    fn parse_uncached(&self, ua: &str) -> Result<Value, String> {
        let extractor = self.extractor()?;
        let (browser, os, device) = extractor.extract(ua);
        let browser = match browser {
            Some(b) => json!({"family": b.family, "major": b.major, "minor": b.minor, "patch": b.patch}),
            None => json!({"family": "Other", "major": null, "minor": null, "patch": null}),
        };
        let os = match os {
            Some(o) => {
                json!({"family": o.os, "major": o.major, "minor": o.minor, "patch": o.patch, "patch_minor": o.patch_minor})
            }
            None => {
                json!({"family": "Other", "major": null, "minor": null, "patch": null, "patch_minor": null})
            }
        };
        let device_family = device.map_or_else(|| "Other".to_string(), |d| d.device.into_owned());
        let kind = device_type(ua, &device_family, os["family"].as_str().unwrap_or("Other"));
        Ok(json!({
            "device": {"family": device_family, "type": kind},
            "browser": browser,
            "os": os,
        }))
    }
}

/// A coarse device type, which uap-core does not give.
fn device_type(ua: &str, device: &str, os: &str) -> &'static str {
    let lower_device = device.to_ascii_lowercase();
    if device == "Spider" {
        return "bot";
    }
    if lower_device.contains("ipad") || lower_device.contains("tablet") || lower_device.contains("kindle") {
        return "tablet";
    }
    if lower_device.contains("iphone") || lower_device.contains("ipod") {
        return "mobile phone";
    }
    match os {
        "Android" => {
            if ua.contains("Mobile") {
                "mobile phone"
            } else {
                "tablet"
            }
        }
        "iOS" | "Windows Phone" | "BlackBerry OS" | "KaiOS" => "mobile phone",
        "Windows" | "Mac OS X" | "Linux" | "Ubuntu" | "Chrome OS" | "Fedora" | "FreeBSD" | "macOS"
            if device == "Other" || device == "Mac" =>
        {
            "desktop"
        }
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_user_agents_parse_to_keens_shape() {
        let parser = UaParser::new();
        let cases = [
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
                json!({"device": {"family": "Other", "type": "desktop"},
                       "browser": {"family": "Chrome", "major": "124", "minor": "0", "patch": "0"},
                       "os": {"family": "Windows", "major": "10", "minor": null, "patch": null, "patch_minor": null}}),
            ),
            (
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
                json!({"device": {"family": "iPhone", "type": "mobile phone"},
                       "browser": {"family": "Mobile Safari", "major": "17", "minor": "4", "patch": null},
                       "os": {"family": "iOS", "major": "17", "minor": "4", "patch": null, "patch_minor": null}}),
            ),
            (
                "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.82 Mobile Safari/537.36",
                json!({"device": {"family": "Pixel 8", "type": "mobile phone"},
                       "browser": {"family": "Chrome Mobile", "major": "124", "minor": "0", "patch": "6367"},
                       "os": {"family": "Android", "major": "14", "minor": null, "patch": null, "patch_minor": null}}),
            ),
            (
                "Mozilla/5.0 (iPad; CPU OS 16_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
                json!({"device": {"family": "iPad", "type": "tablet"},
                       "browser": {"family": "Mobile Safari", "major": "16", "minor": "6", "patch": null},
                       "os": {"family": "iOS", "major": "16", "minor": "7", "patch": null, "patch_minor": null}}),
            ),
            (
                "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
                json!({"device": {"family": "Other", "type": "desktop"},
                       "browser": {"family": "Firefox", "major": "125", "minor": "0", "patch": null},
                       "os": {"family": "Linux", "major": null, "minor": null, "patch": null, "patch_minor": null}}),
            ),
            (
                "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
                json!({"device": {"family": "Spider", "type": "bot"},
                       "browser": {"family": "Googlebot", "major": "2", "minor": "1", "patch": null},
                       "os": {"family": "Other", "major": null, "minor": null, "patch": null, "patch_minor": null}}),
            ),
            (
                "curl/8.5.0",
                json!({"device": {"family": "Other", "type": "other"},
                       "browser": {"family": "curl", "major": "8", "minor": "5", "patch": "0"},
                       "os": {"family": "Other", "major": null, "minor": null, "patch": null, "patch_minor": null}}),
            ),
        ];
        for (ua, expected) in cases {
            assert_eq!(parser.parse(ua).unwrap(), expected, "{ua}");
            assert_eq!(parser.parse(ua).unwrap(), expected, "cached: {ua}");
        }
    }
}
