# Sitewarden bank pack: may this app use this model, for this purpose, on this data?
#
# Input: policies/schemas/inference.input.schema.json. Knobs: data.sitewarden.bank (data.json).
#
# rego-cpp quirk: sprintf("%s"/"%v") on some strings (a builtin's result such as concat's, a string
# literal passed as a function argument or as object.get's default) emits them wrapped in raw
# quotes, which breaks the decision's JSON. So messages are built with m([...]) (concat of parts,
# non-strings formatted with sprintf "%v"), never with sprintf on a string.
#
# Convention: every rule here is a FUNCTION of its input. `decision` is the only rule that reads
# `input`; everything else takes `inp`. rego-cpp (regopy) cannot evaluate `with input as ...` on a
# rule that refers to other rules, so the unit tests call `decide({...})` directly instead.
package sitewarden.inference

decision := decide(input)

decide(inp) := verdict(inp, violations(inp))

# Violations are computed once and passed on (rego-cpp does not memoise function calls).
verdict(inp, v) := allowed(inp, obligations(inp)) if {
	count(v) == 0
} else := {
	"allow": false,
	"reasons": sorted(v),
	"obligations": {},
}

allowed(inp, o) := {
	"allow": true,
	"reasons": sorted(allowed_reasons(inp, o)),
	"obligations": o,
}

# ---------------------------------------------------------------------------------------------
# Accessors (defaults instead of undefined, so that no reason is silently dropped)

purpose(inp) := object.get(inp, "purpose", "")

data_class(inp) := object.get(inp, "data_class", "")

model_name(inp) := object.get(inp, ["model", "name"], "the model")

card(inp) := c if {
	c := inp.model.card
	is_object(c)
} else := {}

nonempty_array(x) if {
	is_array(x)
	count(x) > 0
}

in_array(x, arr) if {
	is_array(arr)
	x in arr
}

class_entry(inp) := e if {
	e := data.sitewarden.bank.data_class_obligations[data_class(inp)]
	is_object(e)
} else := {}

purpose_entry(inp) := e if {
	e := data.sitewarden.bank.purpose_obligations[purpose(inp)]
	is_object(e)
} else := {}

# sorted(s): the set s as a sorted array. rego-cpp quirk: sort() of a SET yields a value that prints
# as an array but is not equal to one and cannot be indexed; sort() of an array is fine.
sorted(s) := sort([x | some x in s])

# m(parts): a message, the parts concatenated; strings as they are, anything else as sprintf "%v"
# prints it (arrays and objects as JSON). See the quirk above: never sprintf a string.
m(parts) := concat("", [str(p) | some p in parts])

str(x) := x if {
	is_string(x)
} else := sprintf("%v", [x])

# ---------------------------------------------------------------------------------------------
# Violations: each helper is a set of deny reasons; the decision allows only if all are empty.

violations(inp) := ((((((((purpose_violations(inp) | class_violations(inp)) | binding_violations(inp)) | intended_purpose_violations(inp)) | card_class_violations(inp)) | restricted_violations(inp)) | forbidden_class_violations(inp)) | config_violations(inp)) | language_model_violations(inp))

purpose_violations(inp) := {msg |
	not is_string(inp.purpose)
	msg := "the request names no purpose"
} | {msg |
	is_string(inp.purpose)
	not inp.purpose in data.sitewarden.bank.purposes
	msg := m(["unknown purpose '", inp.purpose, "': known purposes are ", concat(", ", data.sitewarden.bank.purposes)])
}

class_violations(inp) := {msg |
	not is_string(inp.data_class)
	msg := "the request names no data class"
} | {msg |
	is_string(inp.data_class)
	not inp.data_class in data.sitewarden.bank.data_classes
	msg := m(["unknown data class '", inp.data_class, "': known data classes are ", concat(", ", data.sitewarden.bank.data_classes)])
}

# The app's binding (the site's [apps.<name>]): what its keys may state. The agent refuses a request
# outside it before asking; the pack refuses it too, so that no decision allows what the site's
# binding does not, and a request without a binding (an agent that does not check) is denied.
binding(inp) := b if {
	b := inp.caller.binding
	is_object(b)
} else := null

app_name(inp) := object.get(inp, ["caller", "app"], "the app")

binding_violations(inp) := {msg |
	binding(inp) == null
	msg := m(["the request carries no binding for app '", app_name(inp), "': the agent states what the site lets its keys claim"])
} | {msg |
	b := binding(inp)
	b != null
	some claim in [["purposes", "purpose", purpose(inp)], ["data_classes", "data class", data_class(inp)]]
	not in_array(claim[2], object.get(b, claim[0], null))
	msg := m(["app '", app_name(inp), "' is not bound to ", claim[1], " '", claim[2], "' (bound: ", object.get(b, claim[0], []), ")"])
}

# A model serves only the purposes its model card names.
intended_purpose_violations(inp) := {msg |
	not nonempty_array(object.get(card(inp), "intended_purposes", null))
	msg := m(["the model card of ", model_name(inp), " declares no intended_purposes: the model serves no purpose"])
} | {msg |
	ip := card(inp).intended_purposes
	nonempty_array(ip)
	not purpose(inp) in ip
	msg := m(["purpose '", purpose(inp), "' is not an intended purpose of ", model_name(inp), " (intended: ", ip, ")"])
}

# When the card declares data_classes, the request's data class must be one of them.
card_class_violations(inp) := {msg |
	dcs := card(inp).data_classes
	not is_array(dcs)
	msg := m(["the model card of ", model_name(inp), " has malformed data_classes ", json.marshal(dcs), " (not a list)"])
} | {msg |
	dcs := card(inp).data_classes
	is_array(dcs)
	not data_class(inp) in dcs
	msg := m(["data class '", data_class(inp), "' is not among the data classes the model card of ", model_name(inp), " declares (", dcs, ")"])
}

# Restricted data: only models of an approved risk tier, and only for the purposes the card lists
# in restricted_purposes.
restricted_violations(inp) := {msg |
	data_class(inp) == "restricted"
	tier := object.get(card(inp), "risk_tier", null)
	not tier in data.sitewarden.bank.restricted_data.risk_tiers
	msg := m([
		"restricted data needs a model whose card risk_tier is one of ",
		concat(", ", data.sitewarden.bank.restricted_data.risk_tiers),
		"; ", model_name(inp), " has risk_tier ", tier,
	])
} | {msg |
	data_class(inp) == "restricted"
	not in_array(purpose(inp), object.get(card(inp), "restricted_purposes", null))
	msg := m(["restricted data needs purpose '", purpose(inp), "' in the restricted_purposes of the model card of ", model_name(inp), " (it lists ", object.get(card(inp), "restricted_purposes", []), ")"])
}

# Some purposes never see some data classes (marketing: no confidential or restricted data).
forbidden_class_violations(inp) := {msg |
	forbidden := object.get(data.sitewarden.bank.purpose_forbidden_data_classes, purpose(inp), [])
	in_array(data_class(inp), forbidden)
	msg := m(["purpose '", purpose(inp), "' never sees ", data_class(inp), " data"])
}

# Language models: a request draws at most language_models.max_n sequences (its n, or its candidates),
# and an adapter serves only the purposes (and data classes) its own card names, as its base must.
language_model_violations(inp) := {msg |
	n := object.get(inp, ["request", "n"], 1)
	n > data.sitewarden.bank.language_models.max_n
	msg := m(["the request draws ", n, " sequences; the bank allows at most ", data.sitewarden.bank.language_models.max_n, " (language_models.max_n)"])
} | {msg |
	adapter := inp.adapter
	ip := object.get(adapter, ["card", "intended_purposes"], [])
	not in_array(purpose(inp), ip)
	msg := m(["purpose '", purpose(inp), "' is not an intended purpose of adapter ", object.get(adapter, "name", "the adapter"), " (intended: ", ip, ")"])
} | {msg |
	adapter := inp.adapter
	dcs := adapter.card.data_classes
	not in_array(data_class(inp), dcs)
	msg := m(["data class '", data_class(inp), "' is not among the data classes the card of adapter ", object.get(adapter, "name", "the adapter"), " declares (", dcs, ")"])
} | {msg |
	po := purpose_entry(inp)
	some name in object.get(object.get(po, "sampling", {}), "requirements", [])
	not defined_requirement(name)
	msg := m(["misconfigured pack: sampling requirement '", name, "' (purpose '", purpose(inp), "') is not defined in data.sitewarden.requirements"])
}

# Reading data.sitewarden whole would read this package too (rego-cpp: "recursion"): name the key.
defined_requirement(name) if is_object(data.sitewarden.requirements[name])

# Fail closed on a misconfigured data.json rather than emit a malformed or partial decision.
config_violations(inp) := {msg |
	dc := data_class(inp)
	dc in data.sitewarden.bank.data_classes
	not is_object(object.get(data.sitewarden.bank.data_class_obligations, dc, null))
	msg := m(["misconfigured pack: data.sitewarden.bank.data_class_obligations has no entry for data class '", dc, "'"])
} | {msg |
	some k in object.keys(class_entry(inp))
	not k in class_entry_keys
	msg := m(["misconfigured pack: data.sitewarden.bank.data_class_obligations.", data_class(inp), " has unknown key '", k, "'"])
} | {msg |
	some n in object.get(class_entry(inp), "redact_patterns", [])
	not is_string(object.get(data.sitewarden.bank.redact_patterns, n, null))
	msg := m(["misconfigured pack: redact pattern '", n, "' (data class '", data_class(inp), "') is not defined in data.sitewarden.bank.redact_patterns"])
} | {msg |
	some k in object.keys(purpose_entry(inp))
	not k in data.sitewarden.bank.obligation_keys
	msg := m(["misconfigured pack: data.sitewarden.bank.purpose_obligations.", purpose(inp), " has unknown key '", k, "'"])
}

# Keys a data_class_obligations entry may hold: the plain obligations, plus redact_patterns (names
# of data.sitewarden.bank.redact_patterns) and redact_outputs (output tensor names).
class_entry_keys := {"max_batch", "max_output_tokens", "rate_limit", "log_content", "human_review", "sampling", "redact_patterns", "redact_outputs"}

# ---------------------------------------------------------------------------------------------
# Obligations: by data class, then by purpose (a purpose's obligation overrides the class's).

obligations(inp) := object.union(object.union(class_obligations(inp), redact_obligation(inp)), purpose_obligations(inp))

class_obligations(inp) := {k: v |
	some k in object.keys(class_entry(inp))
	k in data.sitewarden.bank.obligation_keys
	k != "redact"
	v := class_entry(inp)[k]
}

purpose_obligations(inp) := {k: v |
	some k in object.keys(purpose_entry(inp))
	k in data.sitewarden.bank.obligation_keys
	v := purpose_entry(inp)[k]
}

redact_obligation(inp) := {"redact": spec} if {
	spec := object.union(redact_patterns_part(inp), redact_outputs_part(inp))
	count(spec) > 0
} else := {}

redact_patterns_part(inp) := {"patterns": [data.sitewarden.bank.redact_patterns[n] | some n in names]} if {
	names := object.get(class_entry(inp), "redact_patterns", [])
	nonempty_array(names)
} else := {}

redact_outputs_part(inp) := {"outputs": outputs} if {
	outputs := object.get(class_entry(inp), "redact_outputs", [])
	nonempty_array(outputs)
} else := {}

# ---------------------------------------------------------------------------------------------
# Reasons when allowed: which rules allowed, and what the caller must live with.

allowed_reasons(inp, o) := ((({
	m(["purpose '", purpose(inp), "' is an intended purpose of ", model_name(inp)]),
	class_allow_reason(inp),
	m(["obligations for data class '", data_class(inp), "' and purpose '", purpose(inp), "': ", obligation_summary(o)]),
} | restricted_allow_reasons(inp)) | forbidden_class_allow_reasons(inp)) | purpose_obligation_reasons(inp, o))

class_allow_reason(inp) := m(["data class '", data_class(inp), "' allowed: declared in the model card of ", model_name(inp)]) if {
	is_array(card(inp).data_classes)
} else := m(["data class '", data_class(inp), "' allowed: the model card of ", model_name(inp), " declares no data_classes limit"])

restricted_allow_reasons(inp) := {msg |
	data_class(inp) == "restricted"
	msg := m(["restricted data allowed: risk_tier '", card(inp).risk_tier, "' of ", model_name(inp), " is approved for restricted data and '", purpose(inp), "' is one of its restricted_purposes"])
}

forbidden_class_allow_reasons(inp) := {msg |
	p := purpose(inp) # bound first: a call used as an index inside a comprehension trips rego-cpp ("cycle")
	forbidden := data.sitewarden.bank.purpose_forbidden_data_classes[p]
	msg := m(["purpose '", p, "' may see ", data_class(inp), " data (never ", concat(", ", forbidden), ")"])
}

purpose_obligation_reasons(inp, o) := {msg |
	po := purpose_obligations(inp)
	some k in object.keys(po)
	msg := m(["purpose '", purpose(inp), "' carries obligation ", k, " = ", json.marshal(po[k]), basis_suffix(inp)])
}

basis_suffix(inp) := m([" (", b, ")"]) if {
	b := data.sitewarden.bank.purpose_obligation_basis[purpose(inp)]
	is_string(b)
} else := ""

obligation_summary(o) := "none" if {
	count(o) == 0
} else := concat(", ", [s |
	some k in sorted(object.keys(o))
	s := summarise(k, o[k])
])

summarise(k, v) := m(["redact (", count(object.get(v, "patterns", [])), " patterns, ", count(object.get(v, "outputs", [])), " outputs)"]) if {
	k == "redact"
} else := m([k, " ", v])
