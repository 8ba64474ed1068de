// Exhaustive accuracy check of the hand-written log/sin/cos in step_math.h over every input the
// Box-Muller transform can produce (u1 = k 2^-24, k = 1..2^24; th = float(u2 * 2pi), u2 = k 2^-24).
// Build and run:  g++ -O2 -ffp-contract=off -I.. check_math.cpp -o /tmp/check_math && /tmp/check_math
#include <cmath>
#include <cstdio>
#include "../step_math.h"
using namespace fastdiff::math;

static double ulp_err(float got, double want) {
  // error in units of the float32 ulp at the true value
  int e;
  std::frexp(want, &e);
  double ulp = std::ldexp(1.0, e - 24);
  if (want == 0) ulp = std::ldexp(1.0, -149);
  if (ulp < std::ldexp(1.0, -149)) ulp = std::ldexp(1.0, -149);
  return std::fabs((double)got - want) / ulp;
}

int main() {
  double max_log = 0, max_sin = 0, max_cos = 0, max_z = 0;
  float at_log = 0, at_sin = 0, at_cos = 0;
  for (uint32_t k = 0; k < (1u << 24); ++k) {
    float u1 = uniform_open0(k << 8), u2 = uniform_open1(k << 8);
    double el = ulp_err(log_pos(u1), std::log((double)u1));
    if (el > max_log) { max_log = el; at_log = u1; }
    float th = fmul(u2, TWO_PI_F32), s, c;
    sincos_0_2pi(th, s, c);
    double es = ulp_err(s, std::sin((double)th)), ec = ulp_err(c, std::cos((double)th));
    if (es > max_sin) { max_sin = es; at_sin = th; }
    if (ec > max_cos) { max_cos = ec; at_cos = th; }
  }
  std::printf("max error: log %.3f ulp (at %.9g), sin %.3f ulp (at %.9g), cos %.3f ulp (at %.9g)\n",
              max_log, at_log, max_sin, at_sin, max_cos, at_cos);
  return (max_log < 2 && max_sin < 2 && max_cos < 2) ? 0 : 1;
}
