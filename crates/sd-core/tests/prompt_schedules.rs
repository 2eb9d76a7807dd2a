//! A1111 prompt editing and alternation against Lark parses of A1111's own grammar
//! (fixtures/prompts/a1111_schedules.json, written by tools/a1111_prompt_schedules.py).

use sd_core::prompt_schedule::prompt_schedule;

#[test]
fn schedules_match_a1111s_grammar_parsed_by_lark() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/prompts/a1111_schedules.json");
    let text = std::fs::read_to_string(path).expect("fixture");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let base = case["base_steps"].as_u64().expect("base") as usize;
        let hires = case["hires_steps"].as_u64().map(|h| h as usize);
        let want: Vec<(usize, String)> = case["schedule"]
            .as_array()
            .expect("schedule")
            .iter()
            .map(|e| (e[0].as_u64().expect("step") as usize, e[1].as_str().expect("text").to_string()))
            .collect();
        let got: Vec<(usize, String)> = prompt_schedule(prompt, base, hires).into_iter().map(|e| (e.end_at_step, e.text)).collect();
        if got != want {
            failures.push(format!("{prompt:?} ({base}, {hires:?}):\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
