# Sitewarden bank pack: may this site activate this downloaded, TUF-verified release?
#
# Input: policies/schemas/accept.input.schema.json. Knobs: data.sitewarden.bank (data.json), in
# particular data.sitewarden.bank.accept.
#
# Convention (see inference.rego and README.md): every rule is a function of its input; only
# `decision` reads `input`. Messages are built with m([...]), never sprintf on a string (rego-cpp quirk).
package sitewarden.accept

decision := decide(input)

decide(inp) := verdict(inp, violations(inp))

# Violations are computed once and passed on (rego-cpp does not memoise function calls).
verdict(inp, v) := {
	"allow": true,
	"reasons": sorted(allow_reasons(inp)),
	"obligations": {},
} if {
	count(v) == 0
} else := {
	"allow": false,
	"reasons": sorted(v),
	"obligations": {},
}

# ---------------------------------------------------------------------------------------------
# Accessors

artifact_name(inp) := object.get(inp, ["artifact", "name"], "the artifact")

kind(inp) := object.get(inp, ["artifact", "kind"], "")

card(inp) := c if {
	c := inp.artifact.card
	is_object(c)
} else := {}

needs_card(inp) if kind(inp) in data.sitewarden.bank.accept.card_kinds

valid_approvers(inp) := {a |
	some ap in object.get(inp, "approvals", [])
	ap.valid == true
	a := object.get(ap, "approver", "?")
}

nonempty_array(x) if {
	is_array(x)
	count(x) > 0
}

nonempty_object(x) if {
	is_object(x)
	count(x) > 0
}

# sorted(s): the set s as a sorted array. rego-cpp quirk: sort() of a SET yields a value that prints
# as an array but is not equal to one and cannot be indexed; sort() of an array is fine.
sorted(s) := sort([x | some x in s])

# m(parts): a message, the parts concatenated; strings as they are, anything else as sprintf "%v"
# prints it. rego-cpp's sprintf emits some strings wrapped in raw quotes (see inference.rego).
m(parts) := concat("", [str(p) | some p in parts])

str(x) := x if {
	is_string(x)
} else := sprintf("%v", [x])

# ---------------------------------------------------------------------------------------------
# Violations

violations(inp) := ((((((approval_violations(inp) | check_violations(inp)) | purpose_violations(inp)) | risk_tier_violations(inp)) | evaluation_violations(inp)) | data_class_violations(inp)) | licence_violations(inp))

approval_violations(inp) := {msg |
	count(valid_approvers(inp)) < data.sitewarden.bank.accept.min_valid_approvals
	msg := m([artifact_name(inp), " has ", count(valid_approvers(inp)), " valid approval(s); at least ", data.sitewarden.bank.accept.min_valid_approvals, " needed"])
}

check_violations(inp) := {msg |
	not inp.checks.files_complete == true
	msg := m(["files of ", artifact_name(inp), " are incomplete: not every file the manifest lists is present with its SHA-256"])
} | {msg |
	not inp.checks.runtime_supported == true
	msg := m(["runtime '", object.get(inp, ["artifact", "runtime"], ""), "' of ", artifact_name(inp), " is not supported by this agent"])
}

# Models and adapters: the card names the purposes they serve, all of them known to the bank.
purpose_violations(inp) := {msg |
	needs_card(inp)
	not nonempty_array(object.get(card(inp), "intended_purposes", null))
	msg := m(["the model card of ", artifact_name(inp), " declares no intended_purposes"])
} | {msg |
	needs_card(inp)
	ip := card(inp).intended_purposes
	is_array(ip)
	some p in ip
	not p in data.sitewarden.bank.purposes
	msg := m(["the model card of ", artifact_name(inp), " names unknown purpose '", p, "' in intended_purposes (known: ", concat(", ", data.sitewarden.bank.purposes), ")"])
} | {msg |
	needs_card(inp)
	rp := card(inp).restricted_purposes
	not is_array(rp)
	msg := m(["the model card of ", artifact_name(inp), " has malformed restricted_purposes ", rp, " (not a list)"])
} | {msg |
	needs_card(inp)
	rp := card(inp).restricted_purposes
	is_array(rp)
	some p in rp
	not p in object.get(card(inp), "intended_purposes", [])
	msg := m(["the model card of ", artifact_name(inp), " names '", p, "' in restricted_purposes but not in intended_purposes"])
}

risk_tier_violations(inp) := {msg |
	needs_card(inp)
	tier := object.get(card(inp), "risk_tier", null)
	not tier in data.sitewarden.bank.risk_tiers
	msg := m(["the model card of ", artifact_name(inp), " has risk_tier ", tier, "; it must be one of ", concat(", ", data.sitewarden.bank.risk_tiers)])
}

# Every evaluation threshold the card sets must be met by the card's evaluation results.
evaluation_violations(inp) := {msg |
	needs_card(inp)
	not nonempty_object(object.get(card(inp), "evaluation_thresholds", null))
	msg := m(["the model card of ", artifact_name(inp), " declares no evaluation_thresholds (metric -> minimum)"])
} | {msg |
	needs_card(inp)
	th := card(inp).evaluation_thresholds
	nonempty_object(th)
	some metric in object.keys(th)
	not is_number(th[metric])
	msg := m(["evaluation threshold for metric '", metric, "' of ", artifact_name(inp), " is not a number: ", th[metric]])
} | {msg |
	needs_card(inp)
	th := card(inp).evaluation_thresholds
	nonempty_object(th)
	some metric in object.keys(th)
	is_number(th[metric])
	not is_number(object.get(card(inp), ["evaluation", metric], null))
	msg := m(["metric '", metric, "' of ", artifact_name(inp), " has no evaluation result (threshold ", th[metric], ")"])
} | {msg |
	needs_card(inp)
	th := card(inp).evaluation_thresholds
	nonempty_object(th)
	some metric in object.keys(th)
	t := th[metric]
	is_number(t)
	v := object.get(card(inp), ["evaluation", metric], null)
	is_number(v)
	v < t
	msg := m(["metric '", metric, "' of ", artifact_name(inp), " is ", v, ", below its threshold ", t])
}

# When the card declares data_classes, they are all known to the bank.
data_class_violations(inp) := {msg |
	needs_card(inp)
	dcs := card(inp).data_classes
	not is_array(dcs)
	msg := m(["the model card of ", artifact_name(inp), " has malformed data_classes ", dcs, " (not a list)"])
} | {msg |
	needs_card(inp)
	dcs := card(inp).data_classes
	is_array(dcs)
	some dc in dcs
	not dc in data.sitewarden.bank.data_classes
	msg := m(["the model card of ", artifact_name(inp), " names unknown data class '", dc, "' (known: ", concat(", ", data.sitewarden.bank.data_classes), ")"])
}

# Licence allowlist: an empty list in data switches the check off.
licence_violations(inp) := {msg |
	needs_card(inp)
	count(data.sitewarden.bank.accept.licences) > 0
	lic := object.get(card(inp), "licence", null)
	not lic in data.sitewarden.bank.accept.licences
	msg := m(["licence ", lic, " of ", artifact_name(inp), " is not on the allowlist (", concat(", ", data.sitewarden.bank.accept.licences), ")"])
}

# ---------------------------------------------------------------------------------------------
# Reasons when allowed

allow_reasons(inp) := ({
	m([count(valid_approvers(inp)), " valid approval(s) of ", artifact_name(inp), ": ", concat(", ", sorted(valid_approvers(inp)))]),
	m(["files of ", artifact_name(inp), " complete: every file the manifest lists is present with its SHA-256"]),
	m(["runtime '", object.get(inp, ["artifact", "runtime"], ""), "' is supported"]),
} | card_allow_reasons(inp)) | no_card_reasons(inp)

no_card_reasons(inp) := {msg |
	not needs_card(inp)
	msg := m(["kind '", kind(inp), "' needs no model card checks"])
}

card_allow_reasons(inp) := {msg |
	needs_card(inp)
	msg := m(["intended purposes ", card(inp).intended_purposes, " are known purposes"])
} | {msg |
	needs_card(inp)
	msg := m(["risk_tier '", card(inp).risk_tier, "' is a known risk tier"])
} | {msg |
	needs_card(inp)
	th := card(inp).evaluation_thresholds
	some metric in object.keys(th)
	msg := m(["metric '", metric, "' is ", card(inp).evaluation[metric], ", meets its threshold ", th[metric]])
} | {msg |
	needs_card(inp)
	count(data.sitewarden.bank.accept.licences) > 0
	msg := m(["licence ", card(inp).licence, " is on the allowlist"])
}
