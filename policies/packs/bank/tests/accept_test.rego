# Unit tests of the accept decision: functions of input, no `with` (see README.md).
package sitewarden.accept_test

import data.sitewarden.accept

fraud_card := {
	"intended_purposes": ["fraud"],
	"risk_tier": "medium",
	"data_classes": ["public", "internal", "confidential"],
	"evaluation": {"auc": 0.9, "accuracy": 0.95, "average_precision": 0.6},
	"evaluation_thresholds": {"auc": 0.75},
	"licence": "Apache-2.0",
}

release(kind, card) := {
	"site": {"id": "site-1", "name": "Branch 1"},
	"artifact": {
		"name": "fraud-scorer",
		"version": "1.0.0",
		"kind": kind,
		"runtime": "onnx",
		"digest": "0000000000000000000000000000000000000000000000000000000000000000",
		"card": card,
	},
	"approvals": [{"approver": "alice", "valid": true}],
	"checks": {"files_complete": true, "runtime_supported": true},
}

with_card(card) := release("model", card)

# ---------------------------------------------------------------------------------------------

test_demo_model_accepted if {
	d := accept.decide(release("model", fraud_card))
	d.allow == true
	d.obligations == {}
	d.reasons == [
		"1 valid approval(s) of fraud-scorer: alice",
		"files of fraud-scorer complete: every file the manifest lists is present with its SHA-256",
		"intended purposes [\"fraud\"] are known purposes",
		"licence Apache-2.0 is on the allowlist",
		"metric 'auc' is 0.9, meets its threshold 0.75",
		"risk_tier 'medium' is a known risk tier",
		"runtime 'onnx' is supported",
	]
}

test_decision_rule_denies_empty_input if {
	accept.decision.allow == false
	"the artifact has 0 valid approval(s); at least 1 needed" in accept.decision.reasons
}

# Approvals and agent checks

test_no_approval_denied if {
	d := accept.decide(object.union(release("model", fraud_card), {"approvals": []}))
	d.allow == false
	d.reasons == ["fraud-scorer has 0 valid approval(s); at least 1 needed"]
}

test_only_invalid_approvals_denied if {
	d := accept.decide(object.union(release("model", fraud_card), {"approvals": [{"approver": "mallory", "valid": false}]}))
	d.allow == false
	d.reasons == ["fraud-scorer has 0 valid approval(s); at least 1 needed"]
}

test_one_valid_approval_among_invalid_accepted if {
	approvals := [{"approver": "mallory", "valid": false}, {"approver": "bob", "valid": true}]
	d := accept.decide(object.union(release("model", fraud_card), {"approvals": approvals}))
	d.allow == true
	"1 valid approval(s) of fraud-scorer: bob" in d.reasons
}

test_files_incomplete_denied if {
	d := accept.decide(object.union(release("model", fraud_card), {"checks": {"files_complete": false, "runtime_supported": true}}))
	d.allow == false
	d.reasons == ["files of fraud-scorer are incomplete: not every file the manifest lists is present with its SHA-256"]
}

test_runtime_unsupported_denied if {
	d := accept.decide(object.union(release("model", fraud_card), {"checks": {"files_complete": true, "runtime_supported": false}}))
	d.allow == false
	d.reasons == ["runtime 'onnx' of fraud-scorer is not supported by this agent"]
}

test_missing_checks_denied if {
	d := accept.decide(object.remove(release("model", fraud_card), ["checks"]))
	d.allow == false
	count(d.reasons) == 2
}

# Kinds

test_policy_needs_no_card if {
	d := accept.decide(release("policy", {}))
	d.allow == true
	"kind 'policy' needs no model card checks" in d.reasons
}

test_policy_still_needs_approval if {
	d := accept.decide(object.union(release("policy", {}), {"approvals": []}))
	d.allow == false
}

test_adapter_needs_card if {
	d := accept.decide(release("adapter", {}))
	d.allow == false
	"the model card of fraud-scorer declares no intended_purposes" in d.reasons
}

test_model_without_card_denied if {
	r := release("model", {})
	d := accept.decide(object.union(r, {"artifact": object.remove(r.artifact, ["card"])}))
	d.allow == false
	d.reasons == [
		"licence null of fraud-scorer is not on the allowlist (Apache-2.0, MIT, BSD-2-Clause, BSD-3-Clause, internal)",
		"the model card of fraud-scorer declares no evaluation_thresholds (metric -> minimum)",
		"the model card of fraud-scorer declares no intended_purposes",
		"the model card of fraud-scorer has risk_tier null; it must be one of low, medium, high",
	]
}

# Intended purposes

test_missing_intended_purposes_denied if {
	d := accept.decide(with_card(object.remove(fraud_card, ["intended_purposes"])))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer declares no intended_purposes"]
}

test_empty_intended_purposes_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"intended_purposes": []})))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer declares no intended_purposes"]
}

test_unknown_intended_purpose_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"intended_purposes": ["fraud", "trading"]})))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer names unknown purpose 'trading' in intended_purposes (known: fraud, aml, kyc, credit, marketing, service)"]
}

test_restricted_purpose_not_intended_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"restricted_purposes": ["aml"]})))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer names 'aml' in restricted_purposes but not in intended_purposes"]
}

test_restricted_purpose_intended_accepted if {
	d := accept.decide(with_card(object.union(fraud_card, {"restricted_purposes": ["fraud"]})))
	d.allow == true
}

# Risk tier

test_unknown_risk_tier_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"risk_tier": "extreme"})))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer has risk_tier extreme; it must be one of low, medium, high"]
}

test_missing_risk_tier_denied if {
	d := accept.decide(with_card(object.remove(fraud_card, ["risk_tier"])))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer has risk_tier null; it must be one of low, medium, high"]
}

test_every_known_risk_tier_accepted if {
	every tier in data.sitewarden.bank.risk_tiers {
		accept.decide(with_card(object.union(fraud_card, {"risk_tier": tier}))).allow == true
	}
}

# Evaluation thresholds

test_missing_thresholds_denied if {
	d := accept.decide(with_card(object.remove(fraud_card, ["evaluation_thresholds"])))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer declares no evaluation_thresholds (metric -> minimum)"]
}

test_empty_thresholds_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"evaluation_thresholds": {}})))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer declares no evaluation_thresholds (metric -> minimum)"]
}

test_malformed_thresholds_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"evaluation_thresholds": [0.75]})))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer declares no evaluation_thresholds (metric -> minimum)"]
}

test_metric_below_threshold_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"evaluation": {"auc": 0.7}})))
	d.allow == false
	d.reasons == ["metric 'auc' of fraud-scorer is 0.7, below its threshold 0.75"]
}

test_metric_equal_to_threshold_accepted if {
	d := accept.decide(with_card(object.union(fraud_card, {"evaluation": {"auc": 0.75}})))
	d.allow == true
	"metric 'auc' is 0.75, meets its threshold 0.75" in d.reasons
}

test_metric_missing_from_evaluation_denied if {
	card := object.union(fraud_card, {"evaluation_thresholds": {"auc": 0.75, "recall": 0.5}})
	d := accept.decide(with_card(card))
	d.allow == false
	d.reasons == ["metric 'recall' of fraud-scorer has no evaluation result (threshold 0.5)"]
}

test_missing_evaluation_denied if {
	d := accept.decide(with_card(object.remove(fraud_card, ["evaluation"])))
	d.allow == false
	d.reasons == ["metric 'auc' of fraud-scorer has no evaluation result (threshold 0.75)"]
}

test_every_failing_metric_named if {
	card := object.union(fraud_card, {
		"evaluation": {"auc": 0.6, "accuracy": 0.8},
		"evaluation_thresholds": {"auc": 0.75, "accuracy": 0.9},
	})
	d := accept.decide(with_card(card))
	d.allow == false
	d.reasons == [
		"metric 'accuracy' of fraud-scorer is 0.8, below its threshold 0.9",
		"metric 'auc' of fraud-scorer is 0.6, below its threshold 0.75",
	]
}

test_non_numeric_threshold_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"evaluation_thresholds": {"auc": "high"}})))
	d.allow == false
	d.reasons == ["evaluation threshold for metric 'auc' of fraud-scorer is not a number: high"]
}

# Data classes and licence

test_unknown_card_data_class_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"data_classes": ["internal", "secret"]})))
	d.allow == false
	d.reasons == ["the model card of fraud-scorer names unknown data class 'secret' (known: public, internal, confidential, restricted)"]
}

test_licence_not_allowed_denied if {
	d := accept.decide(with_card(object.union(fraud_card, {"licence": "GPL-3.0"})))
	d.allow == false
	d.reasons == ["licence GPL-3.0 of fraud-scorer is not on the allowlist (Apache-2.0, MIT, BSD-2-Clause, BSD-3-Clause, internal)"]
}

test_missing_licence_denied if {
	d := accept.decide(with_card(object.remove(fraud_card, ["licence"])))
	d.allow == false
	d.reasons == ["licence null of fraud-scorer is not on the allowlist (Apache-2.0, MIT, BSD-2-Clause, BSD-3-Clause, internal)"]
}
