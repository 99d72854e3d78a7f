package ally

const atomicInterface = "org.ally.Atomic1."

// Atomic is one of the app's shared signed 64-bit counters, 0 until written, kept by
// the broker (in simulate mode, by the process). Arithmetic wraps on overflow, as
// sync/atomic does. Safe for concurrent use.
type Atomic struct {
	name string
}

// NewAtomic is the app's shared counter name.
func NewAtomic(name string) *Atomic { return &Atomic{name: name} }

// Name is the counter's name.
func (a *Atomic) Name() string { return a.name }

// Add adds delta and returns the new value.
func (a *Atomic) Add(delta int64) (int64, error) {
	if !Managed() {
		v, err := simulatedState.Add(a.name, delta)
		return v, simulated("Add", err)
	}
	var v int64
	err := stateCall(atomicInterface+"Add", []interface{}{&v}, a.name, delta)
	return v, err
}

// Load returns the value (0 for a counter never written, which it does not create).
func (a *Atomic) Load() (int64, error) {
	if !Managed() {
		v, err := simulatedState.Load(a.name)
		return v, simulated("Load", err)
	}
	var v int64
	err := stateCall(atomicInterface+"Load", []interface{}{&v}, a.name)
	return v, err
}

// Store sets the value.
func (a *Atomic) Store(value int64) error {
	if !Managed() {
		return simulated("Store", simulatedState.StoreValue(a.name, value))
	}
	return stateCall(atomicInterface+"Store", nil, a.name, value)
}

// Swap sets the value and returns the previous one.
func (a *Atomic) Swap(value int64) (int64, error) {
	if !Managed() {
		v, err := simulatedState.Swap(a.name, value)
		return v, simulated("Swap", err)
	}
	var old int64
	err := stateCall(atomicInterface+"Swap", []interface{}{&old}, a.name, value)
	return old, err
}

// CompareAndSwap sets the value to new if it is old, and tells whether it did.
func (a *Atomic) CompareAndSwap(old, new int64) (bool, error) {
	if !Managed() {
		ok, err := simulatedState.CompareAndSwapCounter(a.name, old, new)
		return ok, simulated("CompareAndSwap", err)
	}
	var swapped bool
	err := stateCall(atomicInterface+"CompareAndSwap", []interface{}{&swapped}, a.name, old, new)
	return swapped, err
}
