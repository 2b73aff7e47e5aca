# Unit tests of the federation decision: functions of input, no `with` (see README.md).
package sitewarden.federation_test

import data.sitewarden.federation

dp(epsilon) := {"enabled": true, "noise_multiplier": 1.1, "clipping_norm": 1.0, "delta": 0.00001, "epsilon": epsilon}

job(dp, secagg, min_sites) := {
	"site": {"id": "site-1", "name": "Branch 1"},
	"job": {
		"id": "ft-7",
		"name": "fraud fine-tune",
		"base": {"name": "fraud-scorer", "version": "1.0.0"},
		"model_family": "logreg",
		"dataset": "card-transactions",
		"rounds": 5,
		"min_sites": min_sites,
		"strategy": "fedavg",
		"differential_privacy": dp,
		"secure_aggregation": secagg,
		"app": app,
	},
}

app := {
	"name": "fedapp",
	"version": "0.1.0",
	"fab_sha256": "6f1ed002ab5595859014ebf0951522d9b5a4f1d2c2a0bc9c3c9bc2c1b8d5a7e0",
	"fab_id": "sitewarden/sitewarden-fedapp",
	"approvers": ["alice"],
}

test_epsilon_8_allowed if {
	d := federation.decide(job(dp(8), true, 3))
	d.allow == true
	d.obligations == {}
	d.reasons == [
		"job ft-7 enables differential privacy with epsilon 8 (computed at this site), within the maximum 8",
		"job ft-7 needs at least 3 sites (minimum 2)",
		"job ft-7 runs Flower App fedapp 0.1.0, approved by alice",
		"job ft-7 uses secure aggregation",
	]
}

test_epsilon_below_max_allowed if {
	federation.decide(job(dp(1.5), true, 2)).allow == true
}

test_epsilon_8_5_denied if {
	d := federation.decide(job(dp(8.5), true, 3))
	d.allow == false
	d.reasons == ["job ft-7 spends epsilon 8.5, above the maximum 8"]
}

test_epsilon_missing_denied if {
	d := federation.decide(job(object.remove(dp(8), ["epsilon"]), true, 3))
	d.allow == false
	d.reasons == ["job ft-7 has no finite differential privacy epsilon (the budget must be at most 8)"]
}

test_dp_disabled_denied if {
	d := federation.decide(job(object.union(dp(4), {"enabled": false}), true, 3))
	d.allow == false
	d.reasons == ["job ft-7 does not enable differential privacy"]
}

test_dp_missing_denied if {
	j := job(dp(4), true, 3)
	d := federation.decide({"site": j.site, "job": object.remove(j.job, ["differential_privacy"])})
	d.allow == false
	d.reasons == [
		"job ft-7 does not enable differential privacy",
		"job ft-7 has no finite differential privacy epsilon (the budget must be at most 8)",
	]
}

test_no_secure_aggregation_denied if {
	d := federation.decide(job(dp(4), false, 3))
	d.allow == false
	d.reasons == ["job ft-7 does not use secure aggregation"]
}

test_one_site_denied if {
	d := federation.decide(job(dp(4), true, 1))
	d.allow == false
	d.reasons == ["job ft-7 needs only 1 site(s); at least 2 needed so no single site's updates are exposed"]
}

test_two_sites_allowed if {
	federation.decide(job(dp(4), true, 2)).allow == true
}

test_every_failure_named if {
	d := federation.decide(job({"enabled": false}, false, 1))
	d.allow == false
	d.reasons == [
		"job ft-7 does not enable differential privacy",
		"job ft-7 does not use secure aggregation",
		"job ft-7 has no finite differential privacy epsilon (the budget must be at most 8)",
		"job ft-7 needs only 1 site(s); at least 2 needed so no single site's updates are exposed",
	]
}

test_decision_rule_denies_empty_input if {
	federation.decision.allow == false
	count(federation.decision.reasons) == 5
}

test_a_job_without_a_verified_app_denied if {
	j := job(dp(4), true, 3)
	d := federation.decide({"site": j.site, "job": object.remove(j.job, ["app"])})
	d.allow == false
	d.reasons == ["job ft-7 runs no Flower App approved by an approver this site trusts"]
}

test_an_app_nobody_approved_denied if {
	j := job(dp(4), true, 3)
	d := federation.decide({"site": j.site, "job": object.union(j.job, {"app": object.union(app, {"approvers": []})})})
	d.allow == false
	d.reasons == ["job ft-7 runs no Flower App approved by an approver this site trusts"]
}

test_an_understated_declared_epsilon_denied if {
	d := federation.decide(job(object.union(dp(6.2), {"epsilon_declared": 1.5}), true, 3))
	d.allow == false
	d.reasons == ["job ft-7 declares epsilon 1.5 but its parameters spend 6.2 (computed at this site)"]
}

test_a_declared_epsilon_that_matches_allowed if {
	federation.decide(job(object.union(dp(6.2), {"epsilon_declared": 6.2}), true, 3)).allow == true
}
