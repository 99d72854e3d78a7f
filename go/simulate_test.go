package ally

import "testing"

func TestSimulate(t *testing.T) {
	if Managed() {
		t.Skip("runs without a broker (ALLY_ADDRESS is set)")
	}
	runSuite(t)
}
