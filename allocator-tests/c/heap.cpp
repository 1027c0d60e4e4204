// C++ allocations for the c_heap scenario: `new` on one std::thread,
// `delete` on another, each ending before the reading is taken.
#include <malloc.h>
#include <cstddef>
#include <cstring>
#include <thread>
#include <vector>

static std::vector<char *> *held;

extern "C" size_t memwatch_test_cxx_new_on_thread(size_t n, size_t size) {
    size_t usable = 0;
    std::thread t([&] {
        held = new std::vector<char *>();
        held->reserve(n);
        for (size_t i = 0; i < n; i++) {
            char *p = new char[size];
            std::memset(p, 0x5a, size);
            usable += malloc_usable_size(p);
            held->push_back(p);
        }
        usable += malloc_usable_size(held) + malloc_usable_size(held->data());
    });
    t.join();
    return usable;
}

extern "C" void memwatch_test_cxx_delete_on_thread() {
    std::thread t([] {
        for (char *p : *held) delete[] p;
        delete held;
        held = nullptr;
    });
    t.join();
}
