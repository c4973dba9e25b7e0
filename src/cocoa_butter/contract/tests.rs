use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;

/// A payload in three majors: v1 `{n}`, v2 `{n, unit}`, v3 `{amount: {n, unit}}`.
#[derive(Deserialize, JsonSchema)]
struct V1 {
    n: i64,
}
#[derive(Serialize, Deserialize, JsonSchema)]
struct V2 {
    n: i64,
    unit: String,
}
#[derive(Serialize, Deserialize, JsonSchema)]
struct V3 {
    amount: V2,
}
impl From<V1> for V2 {
    fn from(v1: V1) -> Self {
        V2 {
            n: v1.n,
            unit: "each".into(),
        }
    }
}
impl From<V2> for V3 {
    fn from(v2: V2) -> Self {
        V3 { amount: v2 }
    }
}
impl From<V3> for V2 {
    fn from(v3: V3) -> Self {
        v3.amount
    }
}
impl Payload for V3 {
    const MAJOR: u64 = 3;
    fn older() -> Vec<Older> {
        vec![
            Older::upcast::<V1, V2>(1),
            Older::upcast::<V2, V3>(2).with_downcast::<V3, V2>(),
        ]
    }
}

crate::room_actions! {
    enum Act: outputs {
        Counted = "counted",
    }
}

fn contract() -> EventContract {
    EventContract::output::<V3>(Act::Counted, "a count")
}

fn upcast(version: &str, payload: Value) -> Result<Option<Value>, ContractError> {
    contract()
        .to_current(version, &serde_json::to_vec(&payload).expect("json"))
        .map(|bytes| bytes.map(|b| serde_json::from_slice(&b).expect("json")))
}

#[test]
fn an_older_major_passes_every_step_to_the_current_one() {
    assert_eq!(
        upcast("1.0.0", json!({"n": 4})).expect("v1"),
        Some(json!({"amount": {"n": 4, "unit": "each"}}))
    );
    assert_eq!(
        upcast("2.3.1", json!({"n": 4, "unit": "kg"})).expect("v2"),
        Some(json!({"amount": {"n": 4, "unit": "kg"}}))
    );
}

#[test]
fn the_current_major_is_left_as_it_is_whatever_its_minor() {
    assert_eq!(upcast("3.0.0", json!({"x": 1})).expect("v3"), None);
    assert_eq!(upcast("3.9.2", json!({"x": 1})).expect("v3.9"), None);
}

#[test]
fn a_newer_or_retired_or_unreadable_major_is_refused_naming_what_is_read() {
    for version in ["4.0.0", "0.1.0", "", "v2"] {
        let err = upcast(version, json!({"n": 1})).expect_err(version);
        assert!(
            matches!(&err, ContractError::UnsupportedMajor { majors, .. } if majors == "1, 2, 3"),
            "{version}: {err}"
        );
    }
}

#[test]
fn an_old_payload_that_is_not_its_own_shape_names_the_step() {
    let err = upcast("1.0.0", json!({"n": "four"})).expect_err("not a number");
    assert!(
        matches!(&err, ContractError::Upcast { major: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("invalid type"), "{err}");
}

#[test]
fn an_output_goes_back_one_major_for_a_migration_window() {
    let (major, value) = contract()
        .to_previous(&json!({"amount": {"n": 2, "unit": "kg"}}))
        .expect("a previous major")
        .expect("downcast");
    assert_eq!((major, value), (2, json!({"n": 2, "unit": "kg"})));
}

#[test]
fn contracts_and_declared_actions_must_agree() {
    let contracts = Contracts::new(vec![contract()]);
    assert!(contracts.mismatches(&[], &["counted"]).is_empty());
    assert_eq!(
        contracts.mismatches(&["counted"], &["other"]),
        vec![
            "counted is declared as the other direction".to_string(),
            "other has no contract".to_string(),
        ]
    );
}

#[test]
fn every_major_has_its_schema() {
    let majors: Vec<u64> = contract().majors().iter().map(|(m, _)| *m).collect();
    assert_eq!(majors, vec![1, 2, 3]);
    let v1 = (contract().majors()[0].1)();
    assert_eq!(v1.get("required"), Some(&json!(["n"])));
}

#[test]
fn an_output_knows_its_major_and_one_kept_from_before_majors_is_major_1() {
    let built = Outbound::new(
        Act::Counted,
        "a",
        V3 {
            amount: V2 {
                n: 1,
                unit: "kg".into(),
            },
        },
    );
    assert_eq!(built.major, 3);
    let kept: Outbound =
        serde_json::from_value(serde_json::to_value(&built).expect("json")).expect("back");
    assert_eq!(kept.major, 3, "a receipt keeps the major it was built at");
    let older: Outbound = serde_json::from_value(
        json!({"action": "counted", "aggregate_id": "a", "payload": {"n": 1}}),
    )
    .expect("an output kept before majors were recorded");
    assert_eq!(older.major, 1);
}
