"""Tests that play the attacker: one module per attacker and part of the system (hostile
controller, hostile network, hostile app) and the fuzzers of every parser of outside bytes."""
