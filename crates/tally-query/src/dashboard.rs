//! Dashboards: a named grid of saved queries' charts, kept in the catalog for the web UI
//! (`…/dashboards/{name}`). Not part of Keen's API; Keen kept dashboards in its web app.
//!
//! A dashboard is a title and up to [`MAX_TILES`] tiles on a 12-column grid; each tile shows
//! one saved (or cached) query's result, read through the viewer's own key, so a dashboard
//! opened with a scoped access key shows only what that key may see. [`parse_dashboard`]
//! validates a `PUT` body completely before anything is stored.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_core::error::ErrorCode;

use crate::saved::check_name;
use crate::spec::SpecError;

/// Columns of the grid.
pub const GRID_COLUMNS: u32 = 12;
/// The most tiles a dashboard may hold.
pub const MAX_TILES: usize = 64;
/// The tallest tile, in grid rows.
pub const MAX_TILE_HEIGHT: u32 = 12;
/// The lowest row a tile may start on.
pub const MAX_TILE_ROW: u32 = 1_000;
/// The longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 256;

/// How a tile draws its query's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChartKind {
    /// Chosen from the result's shape (the Explorer's rule).
    #[default]
    Auto,
    /// A line over time.
    Line,
    /// Bars, one per group.
    Bar,
    /// One big number.
    Number,
    /// A table.
    Table,
    /// A funnel.
    Funnel,
}

/// One chart on the grid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tile {
    /// The saved query whose result the tile shows.
    pub query_name: String,
    /// A heading; the query's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Left column, 0-based.
    pub x: u32,
    /// Top row, 0-based.
    pub y: u32,
    /// Width in columns.
    pub w: u32,
    /// Height in rows.
    pub h: u32,
    /// How to draw it.
    #[serde(default)]
    pub chart: ChartKind,
}

/// A validated dashboard definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dashboard {
    /// The heading shown above the grid.
    #[serde(default)]
    pub title: String,
    /// The charts.
    pub tiles: Vec<Tile>,
}

fn invalid(message: impl Into<String>) -> SpecError {
    SpecError::new(ErrorCode::InvalidParameter, message)
}

/// Fields of the object a `GET` returns that a client may send back in a `PUT`; they are
/// ignored.
const ECHOED_FIELDS: [&str; 4] = ["dashboard_name", "url", "created_date", "last_modified_date"];

/// Validates a `PUT …/dashboards/{name}` body.
pub fn parse_dashboard(body: &Value) -> Result<Dashboard, SpecError> {
    let Value::Object(fields) = body else {
        return Err(invalid("A dashboard must be a JSON object with 'tiles'."));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "title" | "tiles") && !ECHOED_FIELDS.contains(&k.as_str()))
    {
        return Err(invalid(format!(
            "Unknown dashboard field '{unknown}': use 'title' and 'tiles'."
        )));
    }
    let title = match fields.get("title") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.chars().count() <= MAX_TITLE_CHARS => s.clone(),
        Some(_) => {
            return Err(invalid(format!(
                "The 'title' must be a string of at most {MAX_TITLE_CHARS} characters."
            )));
        }
    };
    let Some(Value::Array(raw_tiles)) = fields.get("tiles") else {
        return Err(invalid("The 'tiles' must be a list (it may be empty)."));
    };
    if raw_tiles.len() > MAX_TILES {
        return Err(invalid(format!("A dashboard holds at most {MAX_TILES} tiles.")));
    }
    let mut tiles = Vec::with_capacity(raw_tiles.len());
    for (i, raw) in raw_tiles.iter().enumerate() {
        let tile: Tile = serde_json::from_value(raw.clone())
            .map_err(|e| invalid(format!("Tile {i} is not valid: {e}.")))?;
        check_tile(&tile).map_err(|m| invalid(format!("Tile {i}: {m}")))?;
        tiles.push(tile);
    }
    Ok(Dashboard { title, tiles })
}

fn check_tile(tile: &Tile) -> Result<(), String> {
    check_name(&tile.query_name).map_err(|e| e.message)?;
    if tile
        .title
        .as_ref()
        .is_some_and(|t| t.chars().count() > MAX_TITLE_CHARS)
    {
        return Err(format!(
            "its 'title' is longer than {MAX_TITLE_CHARS} characters."
        ));
    }
    if !(1..=GRID_COLUMNS).contains(&tile.w) || tile.x >= GRID_COLUMNS || tile.x + tile.w > GRID_COLUMNS {
        return Err(format!(
            "it must fit the {GRID_COLUMNS}-column grid: 'x' from 0, 'w' from 1, 'x' + 'w' at most {GRID_COLUMNS}."
        ));
    }
    if !(1..=MAX_TILE_HEIGHT).contains(&tile.h) || tile.y > MAX_TILE_ROW {
        return Err(format!(
            "'h' must be 1 to {MAX_TILE_HEIGHT} rows and 'y' at most {MAX_TILE_ROW}."
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn a_good_dashboard_parses_and_bad_ones_say_why() {
        let good = json!({"title": "Usage", "tiles": [
            {"query_name": "signups", "x": 0, "y": 0, "w": 6, "h": 4},
            {"query_name": "revenue", "title": "Revenue", "x": 6, "y": 0, "w": 6, "h": 4, "chart": "bar"}
        ], "dashboard_name": "echoed", "url": "/x"});
        let d = parse_dashboard(&good).unwrap();
        assert_eq!(d.tiles.len(), 2);
        assert_eq!(d.tiles[0].chart, ChartKind::Auto);
        assert_eq!(d.tiles[1].chart, ChartKind::Bar);
        for (bad, says) in [
            (json!([]), "JSON object"),
            (json!({"tiles": 3}), "'tiles'"),
            (
                json!({"tiles": [], "colour": "red"}),
                "Unknown dashboard field 'colour'",
            ),
            (
                json!({"tiles": [{"query_name": "a b", "x": 0, "y": 0, "w": 1, "h": 1}]}),
                "Tile 0",
            ),
            (
                json!({"tiles": [{"query_name": "a", "x": 8, "y": 0, "w": 6, "h": 1}]}),
                "12-column grid",
            ),
            (
                json!({"tiles": [{"query_name": "a", "x": 0, "y": 0, "w": 1, "h": 0}]}),
                "'h'",
            ),
            (
                json!({"tiles": [{"query_name": "a", "x": 0, "y": 0, "w": 1, "h": 1, "z": 1}]}),
                "unknown field",
            ),
            (
                json!({"tiles": [{"query_name": "a", "x": 0, "y": 0, "w": 1, "h": 1, "chart": "pie"}]}),
                "unknown variant",
            ),
            (json!({"title": 5, "tiles": []}), "'title'"),
        ] {
            let message = parse_dashboard(&bad).unwrap_err().message;
            assert!(message.contains(says), "{bad}: {message}");
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-3i64..20).prop_map(|n| json!(n)),
            prop::sample::select(vec!["a", "q-1", "bar", "auto", "", "x y", "title"]).prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(3, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "title",
                        "tiles",
                        "query_name",
                        "x",
                        "y",
                        "w",
                        "h",
                        "chart",
                        "z"
                    ])
                    .prop_map(str::to_owned),
                    inner,
                    0..8
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any body gets an answer; whatever is accepted fits the grid and parses again.
        #[test]
        fn any_body_is_accepted_or_refused_and_accepted_ones_round_trip(body in arb_json()) {
            if let Ok(d) = parse_dashboard(&body) {
                for t in &d.tiles {
                    prop_assert!(t.x + t.w <= GRID_COLUMNS && t.w >= 1 && t.h >= 1);
                }
                let again = parse_dashboard(&serde_json::to_value(&d).unwrap()).unwrap();
                prop_assert_eq!(again, d);
            }
        }
    }
}
