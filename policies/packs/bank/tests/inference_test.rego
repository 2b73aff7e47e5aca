# Unit tests of the inference decision. They call inference.decide({...}) directly: `with input as`
# is broken in rego-cpp for rules that refer to other rules (see README.md).
package sitewarden.inference_test

import data.sitewarden.inference

bank := data.sitewarden.bank

# The demo model's card (sitewarden/fraud_model.py), as the agent sends it.
fraud_card := {
	"intended_purposes": ["fraud"],
	"risk_tier": "medium",
	"data_classes": ["public", "internal", "confidential"],
	"evaluation": {"auc": 0.9, "accuracy": 0.95, "average_precision": 0.6},
	"evaluation_thresholds": {"auc": 0.75},
	"licence": "Apache-2.0",
}

# A model approved for restricted data, for AML only.
aml_card := {
	"intended_purposes": ["aml", "kyc"],
	"risk_tier": "high",
	"data_classes": ["internal", "confidential", "restricted"],
	"restricted_purposes": ["aml"],
}

# A model for every purpose, every class, no restriction beyond the pack's.
any_card := {
	"intended_purposes": ["fraud", "aml", "kyc", "credit", "marketing", "service"],
	"risk_tier": "high",
	"restricted_purposes": ["fraud", "aml", "kyc", "credit", "marketing", "service"],
}

model(name, card) := {
	"name": name,
	"version": "1.0.0",
	"kind": "model",
	"runtime": "onnx",
	"digest": "0000000000000000000000000000000000000000000000000000000000000000",
	"approvers": ["alice"],
	"card": card,
}

# An app the site binds to every purpose and data class (and two the pack does not know), so that
# only the pack's own rules decide; the binding's own tests bind more narrowly.
bound_to_all := {
	"purposes": ["fraud", "aml", "kyc", "credit", "marketing", "service", "lending"],
	"data_classes": ["public", "internal", "confidential", "restricted", "secret"],
}

req(purpose, data_class, name, card) := bound_req(purpose, data_class, name, card, bound_to_all)

bound_req(purpose, data_class, name, card, binding) := {
	"site": {"id": "site-1", "name": "Branch 1"},
	"caller": {"app": "scoring", "binding": binding},
	"purpose": purpose,
	"data_class": data_class,
	"model": model(name, card),
	"request": {"batch": 10, "inputs": ["features"]},
}

# The obligation keys decision.schema.json allows; anything else makes a decision malformed.
schema_obligation_keys := {"redact", "max_batch", "max_output_tokens", "rate_limit", "log_content", "human_review", "sampling"}

# ---------------------------------------------------------------------------------------------
# The demo model

test_demo_fraud_confidential_allowed if {
	d := inference.decide(req("fraud", "confidential", "fraud-scorer", fraud_card))
	d.allow == true
	d.reasons == [
		"data class 'confidential' allowed: declared in the model card of fraud-scorer",
		"obligations for data class 'confidential' and purpose 'fraud': log_content false, max_batch 100, max_output_tokens 512, rate_limit 1200, redact (4 patterns, 0 outputs)",
		"purpose 'fraud' is an intended purpose of fraud-scorer",
	]
	d.obligations == {
		"log_content": false,
		"max_batch": 100,
		"max_output_tokens": 512,
		"rate_limit": 1200,
		"redact": {"patterns": [
			bank.redact_patterns.iban,
			bank.redact_patterns.card_pan,
			bank.redact_patterns.labelled_account_number,
			bank.redact_patterns.uk_sort_code_account,
		]},
	}
}

test_demo_marketing_confidential_denied if {
	d := inference.decide(req("marketing", "confidential", "fraud-scorer", fraud_card))
	d.allow == false
	d.reasons == [
		"purpose 'marketing' is not an intended purpose of fraud-scorer (intended: [\"fraud\"])",
		"purpose 'marketing' never sees confidential data",
	]
	d.obligations == {}
}

test_decision_has_exactly_the_three_fields if {
	d := inference.decide(req("fraud", "internal", "fraud-scorer", fraud_card))
	object.keys(d) == {"allow", "reasons", "obligations"}
	d.allow == true
}

# The runner sets input to {}: the entrypoint rule itself must deny it, not be undefined.
test_decision_rule_denies_empty_input if {
	inference.decision.allow == false
	"the request names no purpose" in inference.decision.reasons
	"the request names no data class" in inference.decision.reasons
}

# ---------------------------------------------------------------------------------------------
# Unknown purpose or data class

test_unknown_purpose_denied if {
	d := inference.decide(req("lending", "internal", "any", any_card))
	d.allow == false
	d.reasons == [
		"purpose 'lending' is not an intended purpose of any (intended: [\"fraud\", \"aml\", \"kyc\", \"credit\", \"marketing\", \"service\"])",
		"unknown purpose 'lending': known purposes are fraud, aml, kyc, credit, marketing, service",
	]
}

test_unknown_data_class_denied if {
	d := inference.decide(req("fraud", "secret", "any", any_card))
	d.allow == false
	d.reasons == ["unknown data class 'secret': known data classes are public, internal, confidential, restricted"]
}

test_missing_purpose_and_class_denied if {
	r := object.remove(req("fraud", "internal", "any", any_card), ["purpose", "data_class"])
	d := inference.decide(r)
	d.allow == false
	"the request names no purpose" in d.reasons
	"the request names no data class" in d.reasons
}

test_known_purpose_and_class_allowed if {
	d := inference.decide(req("kyc", "public", "any", any_card))
	d.allow == true
}

# ---------------------------------------------------------------------------------------------
# Intended purposes

test_purpose_not_intended_denied if {
	d := inference.decide(req("credit", "internal", "fraud-scorer", fraud_card))
	d.allow == false
	d.reasons == ["purpose 'credit' is not an intended purpose of fraud-scorer (intended: [\"fraud\"])"]
}

test_card_without_intended_purposes_denied if {
	d := inference.decide(req("fraud", "internal", "m", object.remove(fraud_card, ["intended_purposes"])))
	d.allow == false
	d.reasons == ["the model card of m declares no intended_purposes: the model serves no purpose"]
}

test_card_with_empty_intended_purposes_denied if {
	d := inference.decide(req("fraud", "internal", "m", object.union(fraud_card, {"intended_purposes": []})))
	d.allow == false
	d.reasons == ["the model card of m declares no intended_purposes: the model serves no purpose"]
}

test_card_with_malformed_intended_purposes_denied if {
	d := inference.decide(req("fraud", "internal", "m", object.union(fraud_card, {"intended_purposes": "fraud"})))
	d.allow == false
	d.reasons == ["the model card of m declares no intended_purposes: the model serves no purpose"]
}

test_model_without_card_denied if {
	r := req("fraud", "internal", "m", {})
	d := inference.decide(object.union(r, {"model": object.remove(r.model, ["card"])}))
	d.allow == false
	d.reasons == ["the model card of m declares no intended_purposes: the model serves no purpose"]
}

test_card_not_an_object_denied if {
	d := inference.decide(req("fraud", "internal", "m", "fraud"))
	d.allow == false
	d.reasons == ["the model card of m declares no intended_purposes: the model serves no purpose"]
}

# ---------------------------------------------------------------------------------------------
# Data classes the card declares

test_data_class_not_declared_by_card_denied if {
	card := object.union(fraud_card, {"data_classes": ["public", "internal"]})
	d := inference.decide(req("fraud", "confidential", "m", card))
	d.allow == false
	d.reasons == ["data class 'confidential' is not among the data classes the model card of m declares ([\"public\", \"internal\"])"]
}

test_data_class_declared_by_card_allowed if {
	d := inference.decide(req("fraud", "internal", "fraud-scorer", fraud_card))
	d.allow == true
	"data class 'internal' allowed: declared in the model card of fraud-scorer" in d.reasons
}

test_card_without_data_classes_allows_known_class if {
	d := inference.decide(req("fraud", "confidential", "m", object.remove(fraud_card, ["data_classes"])))
	d.allow == true
	"data class 'confidential' allowed: the model card of m declares no data_classes limit" in d.reasons
}

test_card_with_malformed_data_classes_denied if {
	d := inference.decide(req("fraud", "internal", "m", object.union(fraud_card, {"data_classes": "internal"})))
	d.allow == false
	d.reasons == ["the model card of m has malformed data_classes \"internal\" (not a list)"]
}

# ---------------------------------------------------------------------------------------------
# Restricted data

test_restricted_allowed_for_high_tier_restricted_purpose if {
	d := inference.decide(req("aml", "restricted", "aml-screener", aml_card))
	d.allow == true
	"restricted data allowed: risk_tier 'high' of aml-screener is approved for restricted data and 'aml' is one of its restricted_purposes" in d.reasons
}

test_restricted_denied_for_medium_tier if {
	card := object.union(aml_card, {"risk_tier": "medium"})
	d := inference.decide(req("aml", "restricted", "aml-screener", card))
	d.allow == false
	d.reasons == ["restricted data needs a model whose card risk_tier is one of high; aml-screener has risk_tier medium"]
}

test_restricted_denied_without_risk_tier if {
	card := object.remove(aml_card, ["risk_tier"])
	d := inference.decide(req("aml", "restricted", "aml-screener", card))
	d.allow == false
	d.reasons == ["restricted data needs a model whose card risk_tier is one of high; aml-screener has risk_tier null"]
}

test_restricted_denied_for_purpose_not_in_restricted_purposes if {
	d := inference.decide(req("kyc", "restricted", "aml-screener", aml_card))
	d.allow == false
	d.reasons == ["restricted data needs purpose 'kyc' in the restricted_purposes of the model card of aml-screener (it lists [\"aml\"])"]
}

test_restricted_denied_without_restricted_purposes if {
	card := object.remove(aml_card, ["restricted_purposes"])
	d := inference.decide(req("aml", "restricted", "aml-screener", card))
	d.allow == false
	d.reasons == ["restricted data needs purpose 'aml' in the restricted_purposes of the model card of aml-screener (it lists [])"]
}

test_restricted_denied_when_card_does_not_declare_it if {
	d := inference.decide(req("fraud", "restricted", "fraud-scorer", fraud_card))
	d.allow == false
	count(d.reasons) == 3 # not declared, risk tier, restricted_purposes
}

# ---------------------------------------------------------------------------------------------
# Marketing never sees confidential or restricted data

test_marketing_internal_allowed if {
	d := inference.decide(req("marketing", "internal", "any", any_card))
	d.allow == true
	"purpose 'marketing' may see internal data (never confidential, restricted)" in d.reasons
}

test_marketing_confidential_denied if {
	d := inference.decide(req("marketing", "confidential", "any", any_card))
	d.allow == false
	d.reasons == ["purpose 'marketing' never sees confidential data"]
}

test_marketing_restricted_denied_even_for_approved_model if {
	d := inference.decide(req("marketing", "restricted", "any", any_card))
	d.allow == false
	d.reasons == ["purpose 'marketing' never sees restricted data"]
}

# ---------------------------------------------------------------------------------------------
# Purpose obligations

test_credit_carries_human_review if {
	d := inference.decide(req("credit", "internal", "any", any_card))
	d.allow == true
	d.obligations.human_review == true
	"purpose 'credit' carries obligation human_review = true (EU AI Act Annex III point 5(b): creditworthiness assessment of natural persons is high-risk; a person reviews every outcome)" in d.reasons
}

test_non_credit_has_no_human_review if {
	d := inference.decide(req("fraud", "internal", "any", any_card))
	d.allow == true
	not "human_review" in object.keys(d.obligations)
}

test_service_carries_sampling if {
	d := inference.decide(req("service", "public", "any", any_card))
	d.allow == true
	d.obligations.sampling == {"n": 4, "strategy": "first", "requirements": ["no_account_numbers", "no_guarantees"]}
	some r in d.reasons
	startswith(r, "purpose 'service' carries obligation sampling = ")
}

# ---------------------------------------------------------------------------------------------
# Obligations by data class

class_obligations(dc) := inference.decide(req("fraud", dc, "any", any_card)).obligations

test_limits_follow_data_for_every_class if {
	every dc in bank.data_classes {
		o := class_obligations(dc)
		o.max_batch == bank.data_class_obligations[dc].max_batch
		o.rate_limit == bank.data_class_obligations[dc].rate_limit
		o.max_output_tokens == bank.data_class_obligations[dc].max_output_tokens
		o.log_content == false
	}
}

test_limits_tighten_with_sensitivity if {
	p := class_obligations("public")
	i := class_obligations("internal")
	c := class_obligations("confidential")
	r := class_obligations("restricted")
	p.max_batch > i.max_batch
	i.max_batch > c.max_batch
	c.max_batch > r.max_batch
	p.rate_limit > i.rate_limit
	i.rate_limit > c.rate_limit
	c.rate_limit > r.rate_limit
}

test_shipped_limits if {
	class_obligations("public").max_batch == 1000
	class_obligations("internal").max_batch == 500
	class_obligations("confidential").max_batch == 100
	class_obligations("restricted").max_batch == 20
	class_obligations("public").rate_limit == 6000
	class_obligations("internal").rate_limit == 3000
	class_obligations("confidential").rate_limit == 1200
	class_obligations("restricted").rate_limit == 300
}

test_confidential_and_restricted_redact_iban_and_card_numbers if {
	every dc in ["confidential", "restricted"] {
		pats := class_obligations(dc).redact.patterns
		bank.redact_patterns.iban in pats
		bank.redact_patterns.card_pan in pats
		bank.redact_patterns.labelled_account_number in pats
	}
}

test_public_and_internal_do_not_redact if {
	not "redact" in object.keys(class_obligations("public"))
	not "redact" in object.keys(class_obligations("internal"))
}

test_no_content_logged_for_any_class if {
	every dc in bank.data_classes {
		class_obligations(dc).log_content == false
	}
}

# Every (purpose, data class) pair yields only obligation keys the decision schema allows; with the
# shipped data, every allowed key is used by some pair (a positive control: an empty result fails).
test_obligations_use_only_schema_keys if {
	seen := {k |
		some p in bank.purposes
		some dc in bank.data_classes
		o := inference.decide(req(p, dc, "any", any_card)).obligations
		some k in object.keys(o)
	}
	seen == schema_obligation_keys
}

test_denied_decisions_carry_no_obligations if {
	inference.decide(req("marketing", "restricted", "any", any_card)).obligations == {}
}

# ---------------------------------------------------------------------------------------------
# The redaction patterns match what they should (rego-cpp's regex engine; the agent uses Python re,
# and the patterns are Python-re compatible as well).

test_iban_pattern_matches if {
	regex.match(bank.redact_patterns.iban, "pay DE89 3704 0044 0532 0130 00 now")
	regex.match(bank.redact_patterns.iban, "GB82WEST12345698765432")
	regex.match(bank.redact_patterns.iban, "NO9386011117947")
	not regex.match(bank.redact_patterns.iban, "transaction on 2024-05-12 at 14:00")
}

test_card_pan_pattern_matches if {
	regex.match(bank.redact_patterns.card_pan, "card 4111 1111 1111 1111 blocked")
	regex.match(bank.redact_patterns.card_pan, "4111-1111-1111-1111")
	regex.match(bank.redact_patterns.card_pan, "378282246310005")
	not regex.match(bank.redact_patterns.card_pan, "amount 1234.56 on 2024-05-12, id 123456")
}

test_account_number_patterns_match if {
	regex.match(bank.redact_patterns.labelled_account_number, "Account number: 12345678")
	regex.match(bank.redact_patterns.labelled_account_number, "acct #00123456789")
	regex.match(bank.redact_patterns.labelled_account_number, "A/C no. 1234 5678 90")
	not regex.match(bank.redact_patterns.labelled_account_number, "the account is in good standing since 2019")
	regex.match(bank.redact_patterns.uk_sort_code_account, "12-34-56 12345678")
	not regex.match(bank.redact_patterns.uk_sort_code_account, "2024-05-12")
}

# ---------------------------------------------------------------------------------------------
# The app's binding: what the site lets the app's keys state

test_binding_outside_purpose_denied if {
	binding := {"purposes": ["fraud"], "data_classes": ["confidential"]}
	d := inference.decide(bound_req("marketing", "confidential", "any-model", any_card, binding))
	d.allow == false
	"app 'scoring' is not bound to purpose 'marketing' (bound: [\"fraud\"])" in d.reasons
}

test_binding_outside_data_class_denied if {
	binding := {"purposes": ["fraud"], "data_classes": ["internal"]}
	d := inference.decide(bound_req("fraud", "public", "fraud-scorer", fraud_card, binding))
	d.allow == false
	d.reasons == ["app 'scoring' is not bound to data class 'public' (bound: [\"internal\"])"]
	d.obligations == {}
}

test_binding_inside_allowed if {
	binding := {"purposes": ["fraud"], "data_classes": ["confidential"]}
	d := inference.decide(bound_req("fraud", "confidential", "fraud-scorer", fraud_card, binding))
	d.allow == true
}

test_request_without_binding_denied if {
	inp := object.remove(req("fraud", "confidential", "fraud-scorer", fraud_card), ["caller"])
	d := inference.decide(object.union(inp, {"caller": {"app": "scoring"}}))
	d.allow == false
	"the request carries no binding for app 'scoring': the agent states what the site lets its keys claim" in d.reasons
}

test_malformed_binding_denied if {
	binding := {"purposes": "fraud", "data_classes": ["confidential"]}
	d := inference.decide(bound_req("fraud", "confidential", "fraud-scorer", fraud_card, binding))
	d.allow == false
}

# Language models: n, adapters, and the named requirements of the sampling obligation

lm_req(purpose, data_class, n, adapter_card) := object.union(req(purpose, data_class, "smollm2", any_card), {
	"request": {"batch": 1, "inputs": ["messages"], "n": n, "max_tokens": 64},
	"adapter": object.union(model("router", adapter_card), {"kind": "adapter", "runtime": "transformers"}),
})

router_card := {"intended_purposes": ["service"], "risk_tier": "medium", "data_classes": ["public", "internal"]}

test_lm_request_within_max_n_allowed if {
	d := inference.decide(lm_req("service", "internal", bank.language_models.max_n, router_card))
	d.allow == true
}

test_lm_request_over_max_n_denied if {
	d := inference.decide(lm_req("service", "internal", bank.language_models.max_n + 1, router_card))
	d.allow == false
	d.reasons == [inference.m(["the request draws ", bank.language_models.max_n + 1, " sequences; the bank allows at most ", bank.language_models.max_n, " (language_models.max_n)"])]
}

test_adapter_serves_only_its_own_purposes if {
	d := inference.decide(lm_req("credit", "internal", 1, router_card))
	d.allow == false
	some r in d.reasons
	startswith(r, "purpose 'credit' is not an intended purpose of adapter router")
}

test_adapter_serves_only_its_own_data_classes if {
	d := inference.decide(lm_req("service", "confidential", 1, router_card))
	d.allow == false
	some r in d.reasons
	startswith(r, "data class 'confidential' is not among the data classes the card of adapter router declares")
}

test_every_sampling_requirement_is_defined if {
	every p in object.keys(bank.purpose_obligations) {
		every name in object.get(object.get(bank.purpose_obligations[p], "sampling", {}), "requirements", []) {
			is_string(data.sitewarden.requirements[name].type)
		}
	}
}

test_no_account_numbers_requirement_catches_account_numbers if {
	pattern := data.sitewarden.requirements.no_account_numbers.pattern
	data.sitewarden.requirements.no_account_numbers.type == "not_regex"
	regex.match(pattern, "Your IBAN is DE89 3704 0044 0532 0130 00.")
	regex.match(pattern, "card 4111 1111 1111 1111 expires")
	regex.match(pattern, "Account No: 12345678")
	regex.match(pattern, "sort code 12-34-56 12345678")
	not regex.match(pattern, "Your card is blocked; a new one is on its way.")
}

test_no_guarantees_requirement_names_terms if {
	r := data.sitewarden.requirements.no_guarantees
	r.type == "not_contains"
	"guarantee" in r.terms
	r.ignore_case == true
}
