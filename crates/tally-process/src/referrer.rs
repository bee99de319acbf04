//! `keen:referrer_parser`: referrer and page URLs to `{"medium", "source", "term"}`.
//!
//! Mediums: `INTERNAL` (the referrer is the page's own site), `PAID` (the page URL carries an ad
//! click id, `gclid`/`dclid`/`msclkid`, or a paid `utm_medium` such as `cpc`), `SEARCH`, `SOCIAL`
//! and `EMAIL` from the Snowplow referer-parser database compiled into the binary (with the
//! search `term` from the engine's query parameter), and `UNKNOWN` for any other site.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde_json::Value;

use crate::jsontext::ObjectWriter;

static DATABASE: &str = include_str!("../data/referers.json");

#[derive(Deserialize)]
struct Source {
    domains: Vec<String>,
    #[serde(default)]
    parameters: Vec<String>,
}

#[derive(Debug, Clone)]
struct Known {
    medium: &'static str,
    source: String,
    parameters: Vec<String>,
}

/// `utm_medium` values that mean a paid click.
const PAID_UTM_MEDIUMS: &[&str] = &[
    "cpc",
    "ppc",
    "cpm",
    "cpv",
    "cpa",
    "paid",
    "paidsearch",
    "paid_search",
    "paid-search",
    "paidsocial",
    "paid_social",
    "paid-social",
    "display",
    "banner",
    "retargeting",
];
/// Query parameters ad networks add to the landing page URL.
const AD_CLICK_IDS: &[&str] = &["gclid", "dclid", "gbraid", "wbraid", "msclkid"];

/// The referrer database, indexed by domain (and domain + path for the few entries that have one).
#[derive(Debug, Default)]
pub struct ReferrerParser {
    by_domain: OnceLock<HashMap<String, Known>>,
}

impl ReferrerParser {
    /// A parser; the database is indexed on first use.
    pub fn new() -> Self {
        Self::default()
    }

    fn index(&self) -> &HashMap<String, Known> {
        self.by_domain.get_or_init(|| {
            let raw: HashMap<String, HashMap<String, Source>> =
                serde_json::from_str(DATABASE).expect("the bundled referer database is valid JSON");
            let mut index = HashMap::new();
            for (medium, sources) in raw {
                let medium = match medium.as_str() {
                    "search" => "SEARCH",
                    "social" => "SOCIAL",
                    "email" => "EMAIL",
                    _ => "UNKNOWN",
                };
                for (name, source) in sources {
                    for domain in source.domains {
                        index.insert(
                            domain.to_ascii_lowercase(),
                            Known {
                                medium,
                                source: name.clone(),
                                parameters: source.parameters.clone(),
                            },
                        );
                    }
                }
            }
            index
        })
    }

    fn lookup(&self, host: &str, path: &str) -> Option<&Known> {
        let index = self.index();
        let first_segment = path.split('/').find(|s| !s.is_empty());
        let mut candidate = host;
        loop {
            if let Some(known) =
                first_segment.and_then(|segment| index.get(&format!("{candidate}/{segment}")))
            {
                return Some(known);
            }
            if let Some(known) = index.get(candidate) {
                return Some(known);
            }
            candidate = candidate.split_once('.')?.1;
            if !candidate.contains('.') {
                return None;
            }
        }
    }

    /// Classifies a visit. `None` when the referrer is not an absolute URL with a host (direct
    /// traffic sends an empty referrer); the page URL is only used to recognise internal and paid
    /// traffic, so a bad one does not prevent a result.
    pub fn parse(&self, referrer: &str, page: &str) -> Option<Value> {
        let side = self.referrer_side(referrer)?;
        let page = url::Url::parse(page.trim()).ok();
        let json = self.classify(&side, page.as_ref());
        Some(serde_json::from_str(&json).expect("classify writes valid JSON"))
    }

    /// What the referrer URL alone says: everything about a visit except what the page URL
    /// changes. `None` when it is not an absolute URL with a host. This is the part worth
    /// remembering per referrer ([`crate::enrich::EnrichMemo`]): a site's visits come from a few
    /// referrers again and again.
    pub fn referrer_side(&self, referrer: &str) -> Option<ReferrerSide> {
        let referrer = url::Url::parse(referrer.trim()).ok()?;
        let host = referrer.host_str()?.to_ascii_lowercase();
        let known = self.lookup(&host, referrer.path()).map(|known| {
            let term = (known.medium == "SEARCH")
                .then(|| {
                    referrer
                        .query_pairs()
                        .find(|(name, _)| known.parameters.iter().any(|p| p == name))
                        .map(|(_, value)| value.into_owned())
                })
                .flatten();
            KnownReferrer {
                medium: known.medium,
                source: known.source.clone(),
                term,
            }
        });
        Some(ReferrerSide { host, known })
    }

    /// The add-on's output, as JSON text, for a referrer seen on `page` (if the page URL parsed).
    pub fn classify(&self, side: &ReferrerSide, page: Option<&url::Url>) -> Arc<str> {
        let mut out = ObjectWriter::new();
        let strip_www = |h: &str| h.strip_prefix("www.").unwrap_or(h).to_string();
        let page_host = page.and_then(|p| p.host_str()).map(str::to_ascii_lowercase);
        if page_host.is_some_and(|host| strip_www(&host) == strip_www(&side.host)) {
            return medium_only(out, "INTERNAL");
        }
        let known = side.known.as_ref();
        if let Some(page) = page {
            let mut utm_source = None;
            let mut paid = false;
            for (name, value) in page.query_pairs() {
                let paid_medium =
                    name == "utm_medium" && PAID_UTM_MEDIUMS.contains(&value.to_ascii_lowercase().as_str());
                if AD_CLICK_IDS.contains(&name.as_ref()) || paid_medium {
                    paid = true;
                } else if name == "utm_source" {
                    utm_source = Some(value);
                }
            }
            if paid {
                let source = known
                    .map(|k| k.source.as_str())
                    .or(utm_source.as_deref())
                    .unwrap_or(&side.host);
                out.string("medium", "PAID");
                out.string("source", source);
                out.string_or_null("term", None);
                return out.finish();
            }
        }
        match known {
            Some(known) => {
                out.string("medium", known.medium);
                out.string("source", &known.source);
                out.string_or_null("term", known.term.as_deref());
                out.finish()
            }
            None => medium_only(out, "UNKNOWN"),
        }
    }
}

/// `{"medium": medium, "source": null, "term": null}`.
fn medium_only(mut out: ObjectWriter, medium: &str) -> Arc<str> {
    out.string("medium", medium);
    out.string_or_null("source", None);
    out.string_or_null("term", None);
    out.finish()
}

/// What a referrer URL says on its own ([`ReferrerParser::referrer_side`]).
#[derive(Debug, Clone)]
pub struct ReferrerSide {
    /// The referrer's host, lower case: compared with the page's to recognise internal visits.
    host: String,
    /// The referer database's entry for it, if any.
    known: Option<KnownReferrer>,
}

#[derive(Debug, Clone)]
struct KnownReferrer {
    medium: &'static str,
    source: String,
    /// The search term, for search engines whose query parameter the referrer carries.
    term: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn classifies_search_social_email_internal_paid_and_unknown() {
        let p = ReferrerParser::new();
        let page = "https://shop.example.com/pricing";
        let cases = [
            (
                "https://www.google.com/search?q=event+analytics",
                page,
                json!({"medium": "SEARCH", "source": "Google", "term": "event analytics"}),
            ),
            (
                "https://www.bing.com/search?q=events",
                page,
                json!({"medium": "SEARCH", "source": "Bing", "term": "events"}),
            ),
            (
                "https://duckduckgo.com/?q=keen+io+alternative",
                page,
                json!({"medium": "SEARCH", "source": "DuckDuckGo", "term": "keen io alternative"}),
            ),
            (
                "https://www.facebook.com/",
                page,
                json!({"medium": "SOCIAL", "source": "Facebook", "term": null}),
            ),
            (
                "https://t.co/abc123",
                page,
                json!({"medium": "SOCIAL", "source": "Twitter", "term": null}),
            ),
            (
                "https://mail.google.com/mail/u/0/",
                page,
                json!({"medium": "EMAIL", "source": "Gmail", "term": null}),
            ),
            (
                "https://shop.example.com/docs",
                page,
                json!({"medium": "INTERNAL", "source": null, "term": null}),
            ),
            (
                "https://example.com/internal/page",
                page,
                json!({"medium": "UNKNOWN", "source": null, "term": null}),
            ),
            (
                "https://www.google.com/search?q=x",
                "https://shop.example.com/?gclid=abc",
                json!({"medium": "PAID", "source": "Google", "term": null}),
            ),
            (
                "https://news.site/a",
                "https://shop.example.com/?utm_medium=cpc&utm_source=newsletter",
                json!({"medium": "PAID", "source": "newsletter", "term": null}),
            ),
        ];
        for (referrer, page, expected) in cases {
            assert_eq!(p.parse(referrer, page), Some(expected.clone()), "{referrer}");
        }
        assert_eq!(p.parse("", page), None);
        assert_eq!(p.parse("not a url", page), None);
    }
}
