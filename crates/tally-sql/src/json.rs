//! Arrow rows as JSON objects, for the SQL endpoint's answer.

use datafusion::arrow::array::{Array, AsArray, GenericStringArray, OffsetSizeTrait};
use datafusion::arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
    UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::{Map, Value};
use tally_core::time::format_timestamp_ms;
use tally_store::events::number_value;

/// Appends each row of `batch` as an object keyed by column name.
pub fn append_rows(batch: &RecordBatch, out: &mut Vec<Value>) {
    let schema = batch.schema();
    let columns: Vec<Vec<Value>> = batch.columns().iter().map(|c| values(c.as_ref())).collect();
    for row in 0..batch.num_rows() {
        let mut obj = Map::new();
        for (field, column) in schema.fields().iter().zip(&columns) {
            obj.insert(field.name().clone(), column[row].clone());
        }
        out.push(Value::Object(obj));
    }
}

fn values(array: &dyn Array) -> Vec<Value> {
    macro_rules! prim {
        ($t:ty, $f:expr) => {{
            let a = array.as_primitive::<$t>();
            (0..a.len())
                .map(|i| if a.is_null(i) { Value::Null } else { $f(a.value(i)) })
                .collect()
        }};
    }
    match array.data_type() {
        DataType::Null => vec![Value::Null; array.len()],
        DataType::Boolean => {
            let a = array.as_boolean();
            (0..a.len())
                .map(|i| {
                    if a.is_null(i) {
                        Value::Null
                    } else {
                        Value::Bool(a.value(i))
                    }
                })
                .collect()
        }
        DataType::Int8 => prim!(Int8Type, Value::from),
        DataType::Int16 => prim!(Int16Type, Value::from),
        DataType::Int32 => prim!(Int32Type, Value::from),
        DataType::Int64 => prim!(Int64Type, Value::from),
        DataType::UInt8 => prim!(UInt8Type, Value::from),
        DataType::UInt16 => prim!(UInt16Type, Value::from),
        DataType::UInt32 => prim!(UInt32Type, Value::from),
        DataType::UInt64 => prim!(UInt64Type, Value::from),
        DataType::Float32 => prim!(Float32Type, |v: f32| number_value(f64::from(v))),
        DataType::Float64 => prim!(Float64Type, number_value),
        DataType::Timestamp(TimeUnit::Second, _) => {
            prim!(TimestampSecondType, |v: i64| time(v.saturating_mul(1000)))
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => prim!(TimestampMillisecondType, time),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            prim!(TimestampMicrosecondType, |v: i64| time(v / 1000))
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            prim!(TimestampNanosecondType, |v: i64| time(v / 1_000_000))
        }
        DataType::Utf8 => strings(array.as_string::<i32>()),
        DataType::LargeUtf8 => strings(array.as_string::<i64>()),
        _ => {
            // Anything else (decimals, intervals, lists, dates): its display text.
            let options = FormatOptions::default();
            match ArrayFormatter::try_new(array, &options) {
                Ok(f) => (0..array.len())
                    .map(|i| {
                        if array.is_null(i) {
                            Value::Null
                        } else {
                            Value::String(f.value(i).to_string())
                        }
                    })
                    .collect(),
                Err(_) => vec![Value::Null; array.len()],
            }
        }
    }
}

fn time(ms: i64) -> Value {
    Value::String(format_timestamp_ms(ms))
}

fn strings<O: OffsetSizeTrait>(a: &GenericStringArray<O>) -> Vec<Value> {
    (0..a.len())
        .map(|i| {
            if a.is_null(i) {
                Value::Null
            } else {
                Value::String(a.value(i).to_owned())
            }
        })
        .collect()
}
