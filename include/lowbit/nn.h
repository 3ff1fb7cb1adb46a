// lowbit C++ API, module level: every lowbit::nn module (libtorch users include this one header).
#pragma once
#include "lowbit/nn/q4_conv2d.h"
#include "lowbit/nn/q4_linear.h"
#include "lowbit/nn/q8_linear.h"
